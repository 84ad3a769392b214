"""Builds and runs an `LLMEngine` on its own thread; hands step outputs to an asyncio loop.

The serving process's event loop stays free for requests while the thread steps the
engine; torch releases the GIL inside kernels, so both make progress. All engine state is
touched only by the thread: callers post `add`/`abort` messages.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

import torch

from serving.engine.engine import LLMEngine, StepOutput, StepStats
from serving.engine.sequence import Sequence

logger = logging.getLogger(__name__)
HELD_POLL_S = 0.005  # re-check of sequences held back while nothing runs

OutputsCallback = Callable[[list[StepOutput]], None]


class EngineThread:
    def __init__(
        self,
        build_engine: Callable[[], LLMEngine],
        loop: asyncio.AbstractEventLoop,
        on_outputs: OutputsCallback,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        self._build_engine = build_engine
        self.engine: LLMEngine | None = None
        self._loop = loop
        self._on_outputs = on_outputs  # runs on the event loop
        self._on_step = on_step  # runs on the engine thread
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="inferos-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> LLMEngine:
        """Wait until the engine is built on its thread; re-raises a build failure."""
        await self._loop.run_in_executor(None, self._ready.wait)
        if self._build_error is not None:
            raise RuntimeError("engine failed to start") from self._build_error
        assert self.engine is not None
        return self.engine

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, seq: Sequence) -> None:
        self._inbox.put(("add", seq))
        self._wake.set()

    def set_num_threads(self, num_threads: int) -> None:
        """torch intra-op threads for the steps after this message."""
        self._inbox.put(("threads", num_threads))
        self._wake.set()

    def abort(self, req_id: str) -> None:
        self._inbox.put(("abort", req_id))
        self._wake.set()

    def call(self, fn: Callable[[LLMEngine], None]) -> None:
        """Run `fn(engine)` on the engine thread before its next step (settings changes)."""
        self._inbox.put(("call", fn))
        self._wake.set()

    def _drain_inbox(self) -> None:
        assert self.engine is not None
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add_request(item)  # type: ignore[arg-type]
            elif kind == "call":
                try:
                    item(self.engine)  # type: ignore[operator]
                except Exception:
                    logger.exception("engine call failed")
            elif kind == "threads":
                if torch.get_num_threads() != item:
                    torch.set_num_threads(item)  # type: ignore[arg-type]
            else:
                self.engine.abort(item)  # type: ignore[arg-type]

    def _main(self) -> None:
        # Build the model on this thread too: OpenMP keeps one worker team per calling
        # thread, and a second team (from loading on another thread) measured 1.6-2x slower
        # decode steps on 2 cores.
        try:
            self.engine = self._build_engine()
        except BaseException as e:
            self._build_error = e
            logger.exception("building the engine failed")
            return
        finally:
            self._ready.set()
        self._run()

    def _run(self) -> None:
        assert self.engine is not None
        while True:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step must not kill the replica
                logger.exception("engine step failed; failing its batch")
                outputs = self._fail_all(f"engine step failed: {e}")
            if self._on_step is not None and self.engine.last_step is not None:
                self._on_step(self.engine.last_step)
            if outputs:
                self._loop.call_soon_threadsafe(self._on_outputs, outputs)
            elif self.engine.num_running == 0:  # only waiting ones (the choices of a request
                self._wake.wait(HELD_POLL_S)  # wait for each other): no busy loop
                self._wake.clear()

    def _fail_all(self, message: str) -> list[StepOutput]:
        assert self.engine is not None
        failed = []
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq.req_id)
            failed.append(
                StepOutput(seq.req_id, [], True, "error", len(seq.prompt_token_ids), error=message)
            )
        return failed
