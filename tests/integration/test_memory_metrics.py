"""Issue 16, item 4 on the live app: every engine replica exports where its memory goes
(`inferos:memory_bytes{kind}`) on /metrics and per replica in /v1/metrics, and the numbers
agree with what the model and the KV pool are."""

from __future__ import annotations

import time

import pytest

from serving.metrics import MEMORY_KINDS
from tests.integration.metrics_util import samples

pytestmark = pytest.mark.integration

SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M (tied head); fp32 in the test app


def _memory(app) -> dict[str, float]:
    deadline = time.monotonic() + 30  # engine replicas send metrics every few reports
    while True:
        found = samples(app.metrics_text(), "inferos:memory_bytes", role="decode")
        values = {labels["kind"]: v for labels, v in found}
        if values.get("rss", 0) > 0 or time.monotonic() > deadline:
            return values


def test_memory_bytes_by_kind_on_metrics_and_v1_metrics(app) -> None:
    app.client().completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=4)
    memory = _memory(app)
    assert set(memory) == set(MEMORY_KINDS), memory
    # fp32 weights: at least the parameters at 4 bytes (quantized copies may add to them)
    assert memory["weights"] >= SMOLLM2_PARAMS * 4 * 0.99
    kv = app.config.kv_cache
    per_block = 30 * 2 * kv.block_size * 3 * 64 * 4  # layers, K+V, tokens, kv heads, dims, fp32
    assert memory["kv_budget"] == kv.num_blocks * per_block
    assert 0 <= memory["kv_used"] <= memory["kv_budget"]
    assert memory["rss"] >= memory["weights"]  # loaded weights are resident (the pool fills lazily)
    assert memory["workspace_peak"] >= 0
    with app.http() as http:
        replicas = http.get("/v1/metrics").json()["replicas"]
    decode = [r for key, r in replicas.items() if key.startswith("decode/")]
    assert decode and set(decode[0]["memory_bytes"]) == set(MEMORY_KINDS)
