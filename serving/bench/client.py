"""Async streaming load generator for any OpenAI-compatible server (ours, vLLM, llama.cpp).

One request = `run_one_request()` -> `RequestRecord` holding raw timestamps only; derived
numbers (token counts, ITL) are filled in afterwards by `finalize_record()` so tokenizing never
runs inside the timed streaming loop. A multi-turn mode can reuse `run_one_request()` per turn.

ITL definition. Servers may pack several tokens into one SSE chunk (interval streaming), so the
gap between two chunks is not one inter-token latency. We estimate the tokens in each chunk by
tokenizing its text (1 per chunk without a tokenizer), rescale those estimates so they sum to the
server-reported completion tokens, and record one ITL sample per chunk after the first:
`gap / tokens_in_chunk`. With one token per chunk this is exactly vLLM's ITL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from openai import AsyncOpenAI

from serving.bench.prompts import Prompt, TokenCounter

logger = logging.getLogger(__name__)


class Endpoint(Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    base_url: str
    api_key: str
    endpoint: Endpoint = Endpoint.COMPLETIONS
    max_tokens: int = 128
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 600.0
    # more request fields, e.g. {"logprobs": 5} (sent as the openai client's extra_body)
    extra_body: dict[str, Any] | None = None


@dataclass(slots=True)
class RequestRecord:
    req_id: int
    prompt_tokens: int  # our count of the prompt (exact only with a real tokenizer)
    start_s: float
    first_token_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # one per chunk with content
    chunk_texts: list[str] = field(default_factory=list)
    end_s: float = 0.0
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    error: str | None = None
    # Filled by finalize_record():
    completion_tokens: int = 0
    tokens_per_chunk: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, as vLLM defines TPOT."""
        ttft = self.ttft_s
        if ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.completion_tokens - 1)

    @property
    def text(self) -> str:
        return "".join(self.chunk_texts)


@dataclass(slots=True)
class BenchRun:
    model: str
    records: list[RequestRecord]
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def normalize_base_url(url: str) -> str:
    """`http://host:8000` and `http://host:8000/v1/` both become `http://host:8000/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def resolve_api_key(api_key: str | None) -> str:
    # Local servers ignore the key, but the openai client refuses to start without one.
    return api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"


def make_client(config: ClientConfig) -> AsyncOpenAI:
    # max_retries=0: a retried request would hide failures and skew the latency numbers.
    return AsyncOpenAI(
        base_url=normalize_base_url(config.base_url),
        api_key=config.api_key,
        timeout=config.timeout_s,
        max_retries=0,
    )


async def resolve_model(client: AsyncOpenAI) -> str:
    page = await client.models.list()
    ids = [m.id for m in page.data]
    if not ids:
        raise RuntimeError("GET /v1/models returned no models; pass --model NAME")
    return ids[0]


def _request_kwargs(config: ClientConfig, model: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body: dict[str, Any] = {}
    if config.ignore_eos:
        # Not OpenAI parameters, but vLLM, llama.cpp and our server honour them; without them a
        # request that hits EOS early makes output_len (and tokens/s) meaningless.
        body = {"ignore_eos": True, "min_tokens": config.max_tokens}
    body |= config.extra_body or {}
    if body:
        kwargs["extra_body"] = body
    return kwargs


def _chunk_text(chunk: Any, endpoint: Endpoint) -> str:
    if not chunk.choices:
        return ""  # the final usage-only chunk
    choice = chunk.choices[0]
    if endpoint is Endpoint.COMPLETIONS:
        return choice.text or ""
    delta = choice.delta
    if delta is None:
        return ""
    # Reasoning models stream thoughts in a side field; they are output tokens all the same.
    return (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")


async def run_one_request(
    client: AsyncOpenAI, config: ClientConfig, model: str, prompt: Prompt, req_id: int
) -> RequestRecord:
    """Send one streaming request and time every content chunk; never raises."""
    kwargs = _request_kwargs(config, model)
    record = RequestRecord(req_id=req_id, prompt_tokens=prompt.num_tokens, start_s=0.0)
    record.start_s = time.perf_counter()
    try:
        if config.endpoint is Endpoint.COMPLETIONS:
            stream = await client.completions.create(prompt=prompt.text, **kwargs)
        else:
            messages = [{"role": "user", "content": prompt.text}]
            stream = await client.chat.completions.create(messages=messages, **kwargs)
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    record.usage_prompt_tokens = chunk.usage.prompt_tokens
                    record.usage_completion_tokens = chunk.usage.completion_tokens
                text = _chunk_text(chunk, config.endpoint)
                if not text:
                    continue
                if record.first_token_s is None:
                    record.first_token_s = now
                record.chunk_times_s.append(now)
                record.chunk_texts.append(text)
        if record.first_token_s is None:
            record.error = "stream ended without any content"
    except Exception as e:  # a failed request is a data point, not a crash
        record.error = f"{type(e).__name__}: {e}"
    record.end_s = time.perf_counter()
    return record


def estimate_tokens_per_chunk(
    chunk_texts: list[str], counter: TokenCounter, total_tokens: int | None
) -> list[float]:
    """Tokens in each chunk: tokenized (or 1 each), rescaled to the server's total if known."""
    if counter.exact:
        weights = [float(max(1, counter.count(t))) for t in chunk_texts]
    else:
        weights = [1.0] * len(chunk_texts)
    weight_sum = sum(weights)
    if total_tokens and weight_sum > 0:
        weights = [w * total_tokens / weight_sum for w in weights]
    return weights


def inter_token_latencies(chunk_times_s: list[float], tokens_per_chunk: list[float]) -> list[float]:
    """One sample per chunk after the first: gap since the previous chunk / tokens in it."""
    return [
        (chunk_times_s[i] - chunk_times_s[i - 1]) / max(tokens_per_chunk[i], 1e-9)
        for i in range(1, len(chunk_times_s))
    ]


def finalize_record(record: RequestRecord, counter: TokenCounter) -> None:
    if record.usage_completion_tokens is not None:
        record.completion_tokens = record.usage_completion_tokens
    else:  # server sent no usage: count the output ourselves
        record.completion_tokens = counter.count(record.text) if record.chunk_texts else 0
    record.tokens_per_chunk = estimate_tokens_per_chunk(
        record.chunk_texts, counter, record.completion_tokens or None
    )
    record.itl_s = inter_token_latencies(record.chunk_times_s, record.tokens_per_chunk)


class _Progress:
    """A tqdm bar on a terminal; a periodic plain line in logs, where tqdm's \\r is noise."""

    def __init__(self, total: int, enabled: bool, interval_s: float = 10.0) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.enabled, self.interval_s = enabled, interval_s
        self.start_s = self.last_print_s = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="bench", unit="req")

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += 0 if record.ok else 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed, refresh=False)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last_print_s >= self.interval_s or self.done == self.total):
            self.last_print_s = now
            print(
                f"bench: {self.done}/{self.total} done, {self.failed} failed, "
                f"{now - self.start_s:.1f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


async def run_benchmark(
    config: ClientConfig,
    prompts: list[Prompt],
    concurrency: int,
    counter: TokenCounter,
    model: str | None = None,
    show_progress: bool = True,
) -> BenchRun:
    """Run every prompt once with at most `concurrency` requests in flight."""
    if concurrency <= 0:
        raise ValueError("concurrency must be positive")
    client = make_client(config)
    try:
        model = model or await resolve_model(client)
        semaphore = asyncio.Semaphore(concurrency)
        progress = _Progress(len(prompts), show_progress)

        async def limited(req_id: int, prompt: Prompt) -> RequestRecord:
            async with semaphore:
                return await run_one_request(client, config, model, prompt, req_id)

        start_s = time.perf_counter()
        tasks = [asyncio.create_task(limited(i, p)) for i, p in enumerate(prompts)]
        records: list[RequestRecord] = []
        for next_done in asyncio.as_completed(tasks):
            record = await next_done
            progress.update(record)
            records.append(record)
        end_s = time.perf_counter()
        progress.close()
    finally:
        await client.close()
    for record in records:
        finalize_record(record, counter)
    records.sort(key=lambda r: r.req_id)
    return BenchRun(model=model, records=records, start_s=start_s, end_s=end_s)
