"""16 concurrent streams complete with exact usage, and decode batched them."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai import AsyncOpenAI
from transformers import AutoTokenizer

from serving.models.pull import ensure_default_model
from tests.integration.conftest import MODEL
from tests.integration.metrics_util import samples, total

pytestmark = pytest.mark.integration

NUM_STREAMS = 16
MAX_TOKENS = 24


async def _stream(client: AsyncOpenAI, i: int) -> tuple[int, int, str]:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Count from {i} to {i + 40}, one number per line."}],
        max_tokens=MAX_TOKENS,
        temperature=0.7,
        seed=i,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage = [], None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.delta.content or "")
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens, "".join(text)


def test_sixteen_concurrent_streams_are_batched(app) -> None:
    before = app.metrics_text()
    batched_before = _decode_steps_with_batch_above_one(before)

    async def run_all():
        client = AsyncOpenAI(base_url=f"{app.url}/v1", api_key="test", max_retries=0, timeout=300)
        return await asyncio.gather(*(_stream(client, i) for i in range(NUM_STREAMS)))

    results = asyncio.run(run_all())
    tok = AutoTokenizer.from_pretrained(ensure_default_model(progress=False))
    for i, (prompt_tokens, completion_tokens, text) in enumerate(results):
        messages = [
            {"role": "user", "content": f"Count from {i} to {i + 40}, one number per line."}
        ]
        expected_prompt = tok.encode(
            tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        assert prompt_tokens == len(expected_prompt)
        assert completion_tokens == MAX_TOKENS
        assert text

    # replicas push their metrics about once a second: poll until this run shows up
    deadline = time.monotonic() + 15
    while True:
        after = app.metrics_text()
        batched = _decode_steps_with_batch_above_one(after)
        if batched > batched_before or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert batched > batched_before, "no decode step ran more than one sequence"
    generated = total(after, "inferos:generation_tokens_total") - total(
        before, "inferos:generation_tokens_total"
    )
    assert generated == NUM_STREAMS * MAX_TOKENS


def _decode_steps_with_batch_above_one(text: str) -> float:
    count = total(text, "inferos:engine_batch_size_count", role="decode")
    le_one = [
        v
        for labels, v in samples(text, "inferos:engine_batch_size_bucket", role="decode")
        if labels["le"] == "1.0"
    ]
    return count - sum(le_one)
