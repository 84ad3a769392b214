"""serving/telemetry.py: summaries computed from real instruments' exposition pages."""

from __future__ import annotations

import json
import math

import pytest

from serving.metrics import EngineMetrics, FrontendMetrics, StoreMetrics, merge_expositions
from serving.telemetry import (
    MetricsWindow,
    Snapshot,
    TelemetryWriter,
    histogram_quantile,
    summarize,
)


def page(front: FrontendMetrics, engine: EngineMetrics, store: StoreMetrics) -> str:
    return merge_expositions([front.exposition(), engine.exposition(), store.exposition()])


def test_histogram_quantile_follows_prometheus_interpolation() -> None:
    # 10 observations: 4 in (0, 0.1], 6 in (0.1, 0.5]
    buckets = {0.1: 4.0, 0.5: 10.0, math.inf: 10.0}
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.05)  # 2 of 4 into [0, 0.1]
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 3 / 6)
    # ranks landing in +Inf answer the highest finite bound, as Prometheus does
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 5.0}) == 0.1
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_summary_is_the_difference_between_two_snapshots() -> None:
    front, engine, store = (
        FrontendMetrics("m", "i0"),
        EngineMetrics("m", "decode", "d0"),
        StoreMetrics("m"),
    )
    front.generation_tokens.inc(100)
    front.ttft.observe(5.0)  # before the window: must not count
    old = Snapshot.parse(page(front, engine, store), 10.0)
    front.generation_tokens.inc(50)
    for v in (0.03, 0.03, 0.03, 0.2):
        front.ttft.observe(v)
    engine.step_seconds.observe(0.5)  # busy 0.5 s of the 2 s window
    engine.running.set(3)
    engine.spec_num_draft_tokens.inc(8)
    engine.spec_num_accepted_tokens.inc(6)
    store.bytes_per_level["L1"].set(4096)
    store.delta_ppl_estimate.set(0.01)
    new = Snapshot.parse(page(front, engine, store), 12.0)

    s = summarize(new, old)
    assert s["window_s"] == 2.0
    assert s["tokens_per_s"] == pytest.approx(25.0)
    assert 0.02 < s["ttft_s"]["p50"] <= 0.04  # vLLM buckets 0.02..0.04 hold the median
    assert s["ttft_s"]["p95"] <= 0.25  # the 5 s observation is outside the window
    assert s["replicas"]["decode/d0"]["utilisation"] == pytest.approx(0.25)
    assert s["num_requests_running"] == 3
    assert s["spec_decode"]["acceptance_rate"] == pytest.approx(0.75)
    assert s["kv_bytes_per_level"] == {"L0": 0.0, "L1": 4096.0, "L2": 0.0, "L3": 0.0}
    assert s["delta_ppl_estimate"] == pytest.approx(0.01)
    assert s["itl_s"]["p50"] is None  # nothing observed: no made-up number
    with pytest.raises(ValueError):
        summarize(old, new)


def test_window_keeps_one_snapshot_older_than_its_span() -> None:
    front = FrontendMetrics("m", "i0")
    window = MetricsWindow(window_s=5.0, start_s=0.0)
    for t in range(1, 21):
        front.generation_tokens.inc(10)
        window.add(Snapshot.parse(front.exposition(), float(t)))
    assert window.summary()["tokens_per_s"] == pytest.approx(10.0)
    assert window.summary()["window_s"] == 5.0
    # a rare caller: the rate covers its whole polling period
    rare = MetricsWindow(window_s=5.0, start_s=0.0)
    front2 = FrontendMetrics("m", "i1")
    front2.generation_tokens.inc(600)
    rare.add(Snapshot.parse(front2.exposition(), 60.0))
    assert rare.summary()["tokens_per_s"] == pytest.approx(10.0)
    assert rare.summary()["window_s"] == 60.0


def test_writer_appends_json_lines(tmp_path) -> None:
    front = FrontendMetrics("m", "i0")
    window = MetricsWindow(window_s=5.0, start_s=0.0)
    writer = TelemetryWriter(tmp_path / "logs", "m", "replica-abcdef123")
    for t in (1.0, 2.0):
        front.generation_tokens.inc(7)
        window.add(Snapshot.parse(front.exposition(), t))
        writer.write(window.summary(), {"kv_profile": "safe"})
    assert writer.path.name.startswith("metrics_") and writer.path.suffix == ".jsonl"
    rows = [json.loads(line) for line in writer.path.read_text().splitlines()]
    assert len(rows) == 2
    assert rows[-1]["model"] == "m" and rows[-1]["tps"] == pytest.approx(7.0)
    for key in ("time", "ttft_p95_s", "kv_bytes_per_level", "utilisation", "delta_ppl_estimate"):
        assert key in rows[-1]
    assert rows[-1]["policy"] == {"kv_profile": "safe"}
