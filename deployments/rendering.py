"""A request's answer out of its choices' token streams: detokenized, cut at stop strings,
with logprobs, echo and tool calls, as one JSON body (`collect`) or SSE chunks (`sse`),
counted in the frontend metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from deployments.request_flow import ChoiceRun
from serving.api.detokenizer import IncrementalDetokenizer
from serving.api.errors import ServeError, Unavailable
from serving.api.http_errors import internal_error
from serving.api.prepare import Prepared
from serving.api.responses import SSE_DONE, Usage, sse_error
from serving.api.stream_merge import merge
from serving.messages import TokenDelta
from serving.metrics import FrontendMetrics


class Renderer:
    def __init__(self, tokenizer, metrics: FrontendMetrics):
        self.tokenizer = tokenizer
        self.metrics = metrics

    async def _run(self, p: Prepared, first: TokenDelta, events: AsyncIterator[TokenDelta]):
        """Shared by streaming and non-streaming: yields (text, finish_reason, usage)."""
        detok = IncrementalDetokenizer(
            self.tokenizer, p.prompt_ids, p.params.stop, p.params.include_stop_str_in_output
        )
        usage = Usage(prompt_tokens=len(p.prompt_ids))
        if p.builder.index == 0:  # the choices of a request share its prompt
            self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        last = time.perf_counter()
        delta: TokenDelta | None = first
        while delta is not None:
            if delta.error is not None:
                raise Unavailable(delta.error)
            usage.completion_tokens += len(delta.token_ids)
            self.metrics.generation_tokens.inc(len(delta.token_ids))
            now = time.perf_counter()
            if delta is not first and delta.token_ids:
                gap = (now - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self.metrics.itl.observe(gap)
            last = now
            text = detok.add(delta.token_ids)
            text = self._add_logprobs_and_echo(p, delta, text, delta is first)
            if detok.stopped:
                yield text, "stop", usage
                return
            if delta.finished:
                yield text + detok.flush(), delta.finish_reason, usage
                return
            yield text, None, usage
            delta = await anext(events, None)
        raise Unavailable("the decode stream ended early")

    async def collect(self, p: Prepared, runs: list[ChoiceRun], started: float) -> dict:
        tasks = [asyncio.ensure_future(self._collect_choice(*run)) for run in runs]
        try:
            done = await asyncio.gather(*tasks)
        finally:  # one choice failed (or the client left): the others are aborted
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _, _, events in runs:
                await events.aclose()
        completion_tokens = sum(usage.completion_tokens for _, usage in done)
        self.metrics.e2e.observe(time.perf_counter() - started)
        return p.builder.response(
            [choice for choice, _ in done], Usage(len(p.prompt_ids), completion_tokens)
        )

    async def _collect_choice(
        self, p: Prepared, first: TokenDelta, events: AsyncIterator[TokenDelta]
    ) -> tuple[dict, Usage]:
        parts: list[str] = []
        reason, usage = None, Usage(len(p.prompt_ids))
        async for text, step_reason, step_usage in self._run(p, first, events):
            parts.append(text)
            reason, usage = step_reason, step_usage
        text: str | None = "".join(parts)
        tool_calls = None
        if p.tool_output is not None:  # the answer's tool calls, out of its text
            text, tool_calls, reason = p.tool_output.whole(text or "", reason)
        self.metrics.success(reason or "stop")
        return p.builder.choice(text, reason, self._take_logprobs(p), tool_calls), usage

    async def sse(self, p: Prepared, runs: list[ChoiceRun], started: float) -> AsyncIterator[str]:
        usages = {c.builder.index: Usage(len(p.prompt_ids)) for c, _, _ in runs}
        chunks = [self._choice_chunks(c, first, events, usages) for c, first, events in runs]
        try:
            async for chunk in chunks[0] if len(chunks) == 1 else merge(chunks):
                yield chunk
            if p.include_usage:
                total = sum(u.completion_tokens for u in usages.values())
                yield p.builder.usage_chunk(Usage(len(p.prompt_ids), total))
            self.metrics.e2e.observe(time.perf_counter() - started)
        except Exception as e:  # the status is sent already: the error goes in the stream
            err = e if isinstance(e, ServeError) else internal_error()
            self.metrics.error(err.http_status)
            yield sse_error(err.message, err.error_type, err.http_status)
        finally:
            for chunk_stream in chunks:
                await chunk_stream.aclose()
            for _, _, events in runs:
                await events.aclose()
        yield SSE_DONE

    async def _choice_chunks(
        self,
        p: Prepared,
        first: TokenDelta,
        events: AsyncIterator[TokenDelta],
        usages: dict[int, Usage],
    ) -> AsyncIterator[str]:
        """One choice's SSE chunks; its usage goes into `usages` at its index."""
        b = p.builder
        if b.chat:
            yield b.chunk("", role=True)
        async for text, reason, step_usage in self._run(p, first, events):
            usages[b.index] = step_usage
            if p.tool_output is not None:  # tool calls out of the text, as deltas
                chunks, reason = self._tool_chunks(p, text, reason)
                for chunk in chunks:
                    yield chunk
            elif text:
                yield b.chunk(text, logprobs=self._take_logprobs(p))
            if reason is not None:
                yield b.chunk(None if b.chat else "", reason, logprobs=self._take_logprobs(p))
                self.metrics.success(reason)

    def _tool_chunks(
        self, p: Prepared, text: str, reason: str | None
    ) -> tuple[list[str], str | None]:
        """A streamed piece of a request with tools: its content and tool-call chunks (the
        parser holds what may be a call), all that is held once it ends, and its finish
        reason (`tool_calls` where it called one)."""
        assert p.tool_output is not None
        pieces = p.tool_output.feed(text) if text else []
        if reason is not None:
            rest, reason = p.tool_output.finish(reason)
            pieces += rest
        chunks = [
            p.builder.chunk(
                piece.get("content"),
                logprobs=self._take_logprobs(p),
                tool_calls=piece.get("tool_calls"),
            )
            for piece in pieces
        ]
        return chunks, reason

    @staticmethod
    def _add_logprobs_and_echo(p: Prepared, delta: TokenDelta, text: str, first: bool) -> str:
        """Hands `delta`'s logprobs to the request's renderer (where it asked for them,
        the prompt's first with `echo`); returns `text`, after the prompt on the first."""
        if p.logprobs is not None:
            if first and p.echo_text is not None and delta.prompt_logprobs is not None:
                p.logprobs.add(p.prompt_ids, delta.prompt_logprobs)
            if delta.logprobs is not None:
                p.logprobs.add(delta.token_ids, delta.logprobs)
        return p.echo_text + text if first and p.echo_text is not None else text

    @staticmethod
    def _take_logprobs(p: Prepared) -> dict | None:
        return p.logprobs.take() if p.logprobs is not None else None
