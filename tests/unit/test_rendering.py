"""`Renderer`: a request's choices' token streams -> one OpenAI answer, JSON or SSE, with no
Ray (fake token streams, the real tokenizer): n choices come back by index with their own
text and finish reason, usage counts the prompt once and sums the choices' tokens, and a
choice that fails ends the stream with an error event after which nothing is left running."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from deployments.rendering import Renderer
from serving.api.prepare import ModelInfo, choices, prepare
from serving.messages import TokenDelta
from serving.metrics import FrontendMetrics

MODEL = "m"


def _runs(tokenizer, body: dict, answers: list[str], fail: int | None = None, log=None):
    p = prepare(body, False, tokenizer, ModelInfo(MODEL, 2048, len(tokenizer)))
    runs = []
    for choice, answer in zip(choices(p), answers, strict=True):
        ids = tokenizer.encode(answer, add_special_tokens=False)

        async def rest(c=choice, ids=ids) -> AsyncIterator[TokenDelta]:
            try:
                for i, token in enumerate(ids[1:], start=2):
                    await asyncio.sleep(0.001)
                    if c.builder.index == fail and i == 3:
                        yield TokenDelta(c.req_id, [], True, "error", error="replica failed")
                        return
                    yield TokenDelta(c.req_id, [token], i == len(ids), "length")
            finally:
                if log is not None:
                    log.append(c.builder.index)

        first = TokenDelta(choice.req_id, ids[:1], len(ids) == 1, "length")
        runs.append((choice, first, rest()))
    return p, runs


def test_n_choices_come_back_by_index_with_usage_summed(tokenizer) -> None:
    body = {"model": MODEL, "prompt": "Colours:", "n": 3, "max_tokens": 8}
    answers = [" red and blue", " green", " a pale yellow sky"]
    p, runs = _runs(tokenizer, body, answers)
    renderer = Renderer(tokenizer, FrontendMetrics(MODEL, "r"))
    out = asyncio.run(renderer.collect(p, runs, time.perf_counter()))
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["text"] for c in out["choices"]] == answers
    assert out["id"] == p.req_id
    tokens = sum(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers)
    assert out["usage"]["completion_tokens"] == tokens
    assert out["usage"]["prompt_tokens"] == len(p.prompt_ids)


def _events(chunks: list[str]) -> list[dict | str]:
    data = [c.removeprefix("data: ").strip() for c in chunks]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_streamed_choices_carry_their_index_and_one_usage_chunk_ends_them(tokenizer) -> None:
    body = {"model": MODEL, "prompt": "Colours:", "n": 2, "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    answers = [" red and blue", " green grass"]
    p, runs = _runs(tokenizer, body, answers)
    renderer = Renderer(tokenizer, FrontendMetrics(MODEL, "r"))

    async def read() -> list[str]:
        return [chunk async for chunk in renderer.sse(p, runs, time.perf_counter())]

    events = _events(asyncio.run(read()))
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(p.prompt_ids)
    texts = {0: "", 1: ""}
    reasons = {}
    for event in events[:-2]:
        for c in event["choices"]:
            texts[c["index"]] += c["text"]
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert texts == {0: answers[0], 1: answers[1]}
    assert reasons == {0: "length", 1: "length"}
    indexes = [e["choices"][0]["index"] for e in events[:-2]]
    assert indexes != sorted(indexes), "the choices were not interleaved"


def test_a_failing_choice_ends_the_stream_with_an_error_and_closes_the_others(tokenizer):
    body = {"model": MODEL, "prompt": "Colours:", "n": 2, "max_tokens": 40, "stream": True}
    log: list[int] = []
    answers = [" one two three four five six seven eight nine ten eleven twelve"] * 2
    p, runs = _runs(tokenizer, body, answers, fail=1, log=log)
    renderer = Renderer(tokenizer, FrontendMetrics(MODEL, "r"))

    async def read() -> list[str]:
        return [chunk async for chunk in renderer.sse(p, runs, time.perf_counter())]

    events = _events(asyncio.run(read()))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 503
    assert sorted(log) == [0, 1]  # both token streams were closed
