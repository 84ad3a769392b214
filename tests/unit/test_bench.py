"""`inferos bench`: summary maths, prompt building, and the client against a fake streaming server.

The fake server tests the client (timing, SSE parsing, usage, concurrency), not any engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving import env
from serving.bench import cli
from serving.bench.client import (
    BenchRun,
    ClientConfig,
    Endpoint,
    RequestRecord,
    finalize_record,
    inter_token_latencies,
    normalize_base_url,
    run_benchmark,
)
from serving.bench.prompts import (
    HFTokenCounter,
    Prompt,
    WhitespaceCounter,
    build_prompts,
    load_token_counter,
)
from serving.bench.report import RunInfo, compare, percentile, stats_ms, summarize

CORPUS = " ".join(
    f"The {w} of section {i} was {v} , and it @-@ mattered ."
    for i, (w, v) in enumerate(
        (random.Random(0).choice(["history", "nation", "bridge", "album"]), j) for j in range(400)
    )
)


# ---------------------------------------------------------------- maths


def test_percentile_matches_numpy_linear_interpolation() -> None:
    np = pytest.importorskip("numpy")
    values = [random.Random(1).uniform(0, 100) for _ in range(37)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_ms_converts_and_keeps_keys_when_empty() -> None:
    s = stats_ms([0.010, 0.020, 0.030])
    assert s["mean"] == pytest.approx(20.0)
    assert s["p50"] == pytest.approx(20.0)
    assert s["p99"] == pytest.approx(29.8)
    assert stats_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_itl_divides_chunk_gaps_by_tokens_in_chunk() -> None:
    # chunk 0 at t=1.0 (TTFT), chunk 1 carries 2 tokens after 0.2 s, chunk 2 one token after 0.1 s
    assert inter_token_latencies([1.0, 1.2, 1.3], [1, 2, 1]) == pytest.approx([0.1, 0.1])


def _record(
    req_id: int, start: float, ttft: float, gaps: list[float], tokens: int
) -> RequestRecord:
    times = [start + ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestRecord(
        req_id=req_id,
        prompt_tokens=10,
        start_s=start,
        first_token_s=start + ttft,
        chunk_times_s=times,
        chunk_texts=["x"] * len(times),
        end_s=times[-1],
        usage_completion_tokens=tokens,
    )


def _info(**overrides: Any) -> RunInfo:
    fields: dict[str, Any] = dict(
        base_url="http://x",
        model="m",
        endpoint="completions",
        concurrency=2,
        num_prompts=3,
        input_len=10,
        output_len=4,
        seed=0,
        tokenizer="t",
        exact_input_len=True,
    )
    fields.update(overrides)
    return RunInfo(**fields)


def test_summarize_throughput_latency_and_failures() -> None:
    a = _record(0, 0.0, 0.5, [0.1, 0.1, 0.1], tokens=4)  # e2e 0.8 s
    b = _record(1, 0.0, 1.0, [0.2, 0.2, 0.2], tokens=4)  # e2e 1.6 s
    bad = RequestRecord(req_id=2, prompt_tokens=10, start_s=0.0, end_s=0.1, error="HTTP 500")
    for r in (a, b, bad):
        finalize_record(r, WhitespaceCounter())
    run = BenchRun(model="m", records=[a, b, bad], start_s=0.0, end_s=2.0)
    s = summarize(run, _info())
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["duration_s"] == 2.0
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_tokens_per_s"] == pytest.approx(4.0)
    assert s["total_tokens_per_s"] == pytest.approx((20 + 8) / 2.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(750.0)
    assert s["itl_ms"]["p50"] == pytest.approx(150.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(1200.0)
    assert s["errors"] == ["HTTP 500"]
    json.dumps(s)  # must be JSON-serialisable as is


def test_finalize_without_usage_counts_output_and_spreads_tokens() -> None:
    r = _record(0, 0.0, 0.1, [0.1, 0.1], tokens=0)
    r.usage_completion_tokens = None
    r.chunk_texts = ["one two ", "three ", "four five six"]
    finalize_record(r, WhitespaceCounter())
    assert r.completion_tokens == round(6 * 1.3)
    assert sum(r.tokens_per_chunk) == pytest.approx(r.completion_tokens)


def test_compare_gives_a_over_b_ratios() -> None:
    a = {"output_tokens_per_s": 50.0, "ttft_ms": {"p50": 30.0}, "itl_ms": {"p50": 10.0}}
    b = {"output_tokens_per_s": 100.0, "ttft_ms": {"p50": 60.0}, "itl_ms": {"p50": None}}
    assert compare(a, b) == {"output_tokens_per_s": 0.5, "ttft_ms_p50": 0.5, "itl_ms_p50": None}


def test_normalize_base_url() -> None:
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"


# ---------------------------------------------------------------- prompts


def _tiny_tokenizer() -> HFTokenCounter:
    """A byte-level BPE trained on CORPUS in ~0.1 s, so the exact path runs without a model."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return HFTokenCounter(transformers.PreTrainedTokenizerFast(tokenizer_object=tok), "tiny-bpe")


def _check_exact(counter: HFTokenCounter, text: str, n: int, input_len: int) -> None:
    prompts = build_prompts(text, counter, n, input_len, seed=0)
    assert len(prompts) == n
    assert [counter.count(p.text) for p in prompts] == [input_len] * n
    assert len({p.text for p in prompts}) == n, "slices must differ (no prefix-cache hits)"
    assert build_prompts(text, counter, n, input_len, seed=0) == prompts, "seeded"


def test_exact_prompts_with_a_tiny_tokenizer() -> None:
    _check_exact(_tiny_tokenizer(), CORPUS, n=12, input_len=37)


def test_exact_prompts_with_default_model_tokenizer_on_wikitext() -> None:
    if not env.default_model_dir().exists():
        pytest.skip(f"default model folder {env.default_model_dir()} absent (convert it first)")
    if not env.wikitext_path().exists():
        pytest.skip(f"WikiText file {env.wikitext_path()} absent (set INFEROS_SHARED_DATA)")
    counter = load_token_counter(str(env.default_model_dir()))
    _check_exact(counter, env.wikitext_path().read_text(encoding="utf-8"), n=20, input_len=64)


def test_approx_prompts_on_wikitext() -> None:
    if not env.wikitext_path().exists():
        pytest.skip(f"WikiText file {env.wikitext_path()} absent (set INFEROS_SHARED_DATA)")
    text = env.wikitext_path().read_text(encoding="utf-8")
    prompts = build_prompts(text, WhitespaceCounter(), 5, 130, seed=0)
    assert all(len(p.text.split()) == 100 for p in prompts)
    assert prompts != build_prompts(text, WhitespaceCounter(), 5, 130, seed=1)


# ---------------------------------------------------------------- fake server + client


def _fake_app(requests: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0,
                                            "owned_by": "test"}]}  # fmt: skip

    async def stream(body: dict[str, Any], chat: bool) -> AsyncIterator[str]:
        num_tokens, sent, i = body["max_tokens"], 0, 0
        base = {"id": "x", "created": 0, "model": body["model"]}
        obj = "chat.completion.chunk" if chat else "text_completion"
        while sent < num_tokens:
            await asyncio.sleep(0.003)
            n = min(
                1 + i % 2, num_tokens - sent
            )  # 1 or 2 tokens per chunk, like interval streaming
            text = "tok " * n
            choice = {"index": 0, "finish_reason": None, "logprobs": None}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            yield f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n"
            sent, i = sent + n, i + 1
        usage = {"prompt_tokens": 7, "completion_tokens": sent, "total_tokens": 7 + sent}
        yield f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool) -> Any:
        body = await request.json()
        requests.append(body)
        if body["model"] != "fake-model":
            return JSONResponse({"error": {"message": "unknown model"}}, status_code=404)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    # Bind port 0 ourselves and hand uvicorn the socket: no race for a "free" port.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_fake_app(requests), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}", requests
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.parametrize("endpoint", [Endpoint.COMPLETIONS, Endpoint.CHAT])
def test_client_end_to_end_against_fake_server(
    fake_server: tuple[str, list[dict[str, Any]]], endpoint: Endpoint
) -> None:
    base_url, requests = fake_server
    requests.clear()
    prompts = [Prompt(f"prompt {i}", 2) for i in range(5)]
    config = ClientConfig(base_url=base_url, api_key="EMPTY", endpoint=endpoint, max_tokens=6)
    run = asyncio.run(run_benchmark(config, prompts, 2, WhitespaceCounter(), show_progress=False))
    assert run.model == "fake-model"  # resolved from /v1/models
    assert [r.error for r in run.records] == [None] * 5
    for r in run.records:
        assert r.completion_tokens == 6 and r.usage_prompt_tokens == 7
        assert r.ttft_s is not None and r.ttft_s > 0
        assert len(r.itl_s) == 3 and all(x > 0 for x in r.itl_s)  # chunks of 1,2,1,2 tokens
        assert sum(r.tokens_per_chunk) == pytest.approx(6)
    body = requests[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["ignore_eos"], body["min_tokens"], body["temperature"]) == (True, 6, 0.0)
    s = summarize(run, _info(concurrency=2, num_prompts=5, output_len=6))
    assert (s["completed"], s["failed"], s["ttft_ms"]["p50"] > 0) == (5, 0, True)


def test_client_records_http_errors(fake_server: tuple[str, list[dict[str, Any]]]) -> None:
    base_url, _ = fake_server
    config = ClientConfig(base_url=base_url + "/v1", api_key="k", max_tokens=3, ignore_eos=False)
    prompts = [Prompt("p", 1)] * 2
    run = asyncio.run(
        run_benchmark(config, prompts, 4, WhitespaceCounter(), model="nope", show_progress=False)
    )
    assert all(r.error and "404" in r.error for r in run.records)


def test_cli_run_writes_json_and_png(
    fake_server: tuple[str, list[dict[str, Any]]], tmp_path: Any, capsys: Any
) -> None:
    base_url, _ = fake_server
    source = tmp_path / "source.txt"
    source.write_text(CORPUS, encoding="utf-8")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "r" / "bench.json"
    args = parser.parse_args(
        ["--base-url", base_url, "--concurrency", "3", "--num-prompts", "6", "--input-len", "13",
         "--output-len", "5", "--prompts-file", str(source), "--output-json", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert cli.run(args) == 0
    summary = json.loads(out.read_text())
    for key in ("base_url", "model", "concurrency", "num_prompts", "input_len", "output_len",
                "completed", "failed", "duration_s", "request_throughput", "output_tokens_per_s",
                "total_tokens_per_s", "ttft_ms", "itl_ms", "e2e_ms", "tpot_ms"):  # fmt: skip
        assert key in summary
    assert set(summary["itl_ms"]) == {"mean", "p50", "p90", "p99"}
    assert (summary["completed"], summary["model"], summary["output_len"]) == (6, "fake-model", 5)
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    stdout = capsys.readouterr().out
    assert "bench config:" in stdout and "seed=0" in stdout
    assert stdout.strip().splitlines()[-1].startswith("bench fake-model c=3 ok=6/6")


def test_extra_body_is_sent_with_the_requests() -> None:
    from serving.bench.client import _request_kwargs

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--extra-body", '{"logprobs": 5}'])
    config = ClientConfig("http://x", "k", max_tokens=8, extra_body=args.extra_body)
    body = _request_kwargs(config, "m")["extra_body"]
    assert body == {"ignore_eos": True, "min_tokens": 8, "logprobs": 5}
    plain = ClientConfig("http://x", "k", ignore_eos=False)
    assert "extra_body" not in _request_kwargs(plain, "m")
    with pytest.raises(SystemExit):
        parser.parse_args(["--extra-body", "[1]"])
