"""Prefill on torch → decode on ONNX Runtime (CPU provider) through the real app: the same
greedy tokens as torch → torch, the KV crossing the kv_store, and the provider visible in
/metrics, /v1/metrics and the replica's stats, after a fallback from an absent provider."""

from __future__ import annotations

import time

import pytest
import ray

from tests.integration.conftest import MODEL
from tests.integration.metrics_util import samples

pytestmark = pytest.mark.integration

PROMPTS = [
    [{"role": "user", "content": "Tell me a long story about a dragon who learns to read."}],
    [{"role": "user", "content": "Name three rivers in Europe and say where they flow."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
]
NUM_TOKENS = 24
# Dml first: absent on this box, so the replica must fall back to CPU, warn, and start.
ORT_DECODE = {
    "decode": {
        "backend": "onnxruntime",
        "execution_providers": ["DmlExecutionProvider", "CPUExecutionProvider"],
    }
}


def _greedy(app, messages: list[dict]) -> tuple[str, int, str]:
    resp = app.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=NUM_TOKENS,
        temperature=0,
        extra_body={"min_tokens": NUM_TOKENS},
    )
    return resp.choices[0].message.content, resp.usage.completion_tokens, resp.id


def test_torch_prefill_ort_decode_matches_torch_torch(apps) -> None:
    torch_app = apps.get()
    expected = [_greedy(torch_app, p)[:2] for p in PROMPTS]
    assert apps.get().deployment("decode").stats.remote().result()["backend"] == "torch"

    app = apps.get(ORT_DECODE)
    decode = app.deployment("decode")
    before = decode.stats.remote().result()
    assert before["backend"] == "onnxruntime"
    assert before["execution_provider"] == "CPUExecutionProvider"
    assert "DmlExecutionProvider" in before["backend_note"]

    results = [_greedy(app, p) for p in PROMPTS]
    assert [r[:2] for r in results] == expected
    after = decode.stats.remote().result()
    assert after["num_imported"] == before["num_imported"] + len(PROMPTS)
    assert after["num_local_prefills"] == before["num_local_prefills"]
    # the prompt's KV came from the torch prefill replica through the store
    entry = ray.get(app.kv_store().lookup.remote(f"kv-{results[0][2]}"))
    assert entry is not None and entry["consumers"]

    # streaming takes the same path and yields the same text
    with app.client().chat.completions.create(
        model=MODEL,
        messages=PROMPTS[1],
        max_tokens=NUM_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"min_tokens": NUM_TOKENS},
    ) as stream:
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == expected[1][0]

    _provider_is_visible(app)


def _provider_is_visible(app) -> None:
    deadline = time.monotonic() + 30
    while True:  # replicas push their metrics with every other load report
        found = samples(app.metrics_text(), "inferos:execution_provider_info", role="decode")
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(labels["provider"], v) for labels, v in found] == [
        ("onnxruntime-CPUExecutionProvider", 1.0)
    ]
    prefill = samples(app.metrics_text(), "inferos:execution_provider_info", role="prefill")
    assert [(labels["provider"], v) for labels, v in prefill] == [("torch-cpu", 1.0)]

    with app.http() as http:
        http.get("/v1/metrics")  # the first call opens the window
        time.sleep(1.1)
        replicas = http.get("/v1/metrics").json()["replicas"]
    providers = {key.split("/")[0]: r["execution_provider"] for key, r in replicas.items()}
    assert providers["decode"] == "onnxruntime-CPUExecutionProvider"
    assert providers["prefill"] == "torch-cpu"
