"""A client that disconnects mid-stream frees its sequence and KV blocks."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.integration.conftest import MODEL
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration


def test_disconnect_mid_stream_frees_sequence_and_blocks(app) -> None:
    decode = app.deployment("decode")
    body = {
        "model": MODEL,
        "prompt": "Write an endless list of colors:",
        "max_tokens": 1800,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=app.url, timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [next(lines) for _ in range(12)]
            assert any(line.startswith("data: ") for line in received)
            busy = decode.stats.remote().result()
            assert busy["num_running"] >= 1 and busy["kv_blocks_used"] > 0
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = decode.stats.remote().result()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0:
            break
        time.sleep(0.5)
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0, stats
    # the ingress counted the dropped request out of its admission limit
    while time.monotonic() < deadline + 10:
        in_flight = total(app.metrics_text(), "inferos:ingress_requests_in_flight")
        if in_flight == 0:
            break
        time.sleep(0.5)
    assert in_flight == 0
