"""Runs an `LLMEngine` on its own thread and hands step outputs to an asyncio loop.

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

from serving.engine.engine import LLMEngine, StepOutput, StepStats
from serving.engine.sequence import Sequence

logger = logging.getLogger(__name__)

OutputsCallback = Callable[[list[StepOutput]], None]


class EngineThread:
    def __init__(
        self,
        engine: LLMEngine,
        loop: asyncio.AbstractEventLoop,
        on_outputs: OutputsCallback,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        self.engine = engine
        self._loop = loop
        self._on_outputs = on_outputs  # runs on the event loop
        self._on_step = on_step  # runs on the engine thread
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inferos-engine", daemon=True)
        self._thread.start()

    def add(self, seq: Sequence) -> None:
        self._inbox.put(("add", seq))
        self._wake.set()

    def abort(self, req_id: str) -> None:
        self._inbox.put(("abort", req_id))
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add_request(item)  # type: ignore[arg-type]
            else:
                self.engine.abort(item)  # type: ignore[arg-type]

    def _run(self) -> None:
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

    def _fail_all(self, message: str) -> list[StepOutput]:
        failed = []
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(seq.req_id)
            failed.append(
                StepOutput(seq.req_id, [], True, "error", len(seq.prompt_token_ids), error=message)
            )
        return failed
