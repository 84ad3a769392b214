"""The Grafana dashboard only queries series our code exports, and its ConfigMap is in sync.

The exported names come from the real instruments of serving/metrics.py, merged the way the
ingress merges them for /metrics, then parsed back with prometheus_client's parser.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import (
    EngineMetrics,
    FrontendMetrics,
    SchedulerMetrics,
    StoreMetrics,
    merge_expositions,
)

K8S = Path(__file__).resolve().parents[2] / "k8s"
DASHBOARD = K8S / "monitoring" / "grafana-dashboard.json"
METRIC = re.compile(r"inferos:[a-zA-Z0-9_:]+")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def exprs() -> list[str]:
    return [t["expr"] for p in panels() for t in p.get("targets", [])]


def exported_sample_names() -> set[str]:
    front = FrontendMetrics("m", "0")
    front.ttft.observe(0.1)
    front.itl.observe(0.01)
    front.e2e.observe(1.0)
    front.prompt_tokens.inc(3)
    front.generation_tokens.inc(2)
    front.success("stop")
    front.error(429)
    engines = [EngineMetrics("m", role, "0") for role in ("prefill", "decode")]
    for e in engines:
        e.batch_size.observe(4)
        e.step_seconds.observe(0.01)
        e.iteration_tokens.observe(16)
    scheduler = SchedulerMetrics("m")
    scheduler.decision("pinned")
    parts = [front, *engines, StoreMetrics("m"), scheduler]
    merged = merge_expositions(p.exposition() for p in parts)
    return {s.name for fam in text_string_to_metric_families(merged) for s in fam.samples}


def test_dashboard_shape() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels():
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_query_is_filtered_by_the_model_variable() -> None:
    for expr in exprs():
        for m in METRIC.finditer(expr):
            assert expr[m.end() :].startswith('{model=~"$model"'), expr


def test_histogram_quantiles_aggregate_buckets_by_le() -> None:
    quantiles = [e for e in exprs() if "histogram_quantile" in e]
    assert quantiles
    for expr in quantiles:
        assert re.search(r"sum by \(le\b|sum by \([^)]*\ble\b", expr), expr
        assert all(n.endswith("_bucket") for n in METRIC.findall(expr)), expr


def test_dashboard_queries_only_exported_series() -> None:
    exported = exported_sample_names()
    variable_queries = [json.dumps(v.get("query", "")) for v in dashboard()["templating"]["list"]]
    used = {n for text in [*exprs(), *variable_queries] for n in METRIC.findall(text)}
    missing = sorted(used - exported)
    assert not missing, f"not exported by serving/metrics.py: {missing}"
    # the panels the operations dashboard is meant to have
    for name in (
        "inferos:generation_tokens_total",
        "inferos:prompt_tokens_total",
        "inferos:request_success_total",
        "inferos:request_errors_total",
        "inferos:time_to_first_token_seconds_bucket",
        "inferos:inter_token_latency_seconds_bucket",
        "inferos:e2e_request_latency_seconds_bucket",
        "inferos:num_requests_running",
        "inferos:num_requests_waiting",
        "inferos:kv_cache_usage_perc",
        "inferos:kv_cache_blocks_used",
        "inferos:kv_store_bytes",
        "inferos:kv_store_blocks",
        "inferos:routing_decisions_total",
        "inferos:engine_step_seconds_bucket",
        "inferos:engine_batch_size_sum",
        "inferos:kv_bytes_per_level",
        "inferos:kv_blocks_per_level",
        "inferos:kv_demotions_total",
        "inferos:spec_decode_num_accepted_tokens_total",
        "inferos:spec_decode_num_draft_tokens_total",
        "inferos:engine_step_seconds_sum",
        "inferos:execution_provider_info",
        "inferos:memory_bytes",
    ):
        assert name in used, name


def _make_configmap() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_configmap", K8S / "make_configmap.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configmap_in_sync_with_dashboard_json() -> None:
    mk = _make_configmap()
    expected = mk.render(DASHBOARD.read_text(encoding="utf-8"))
    assert mk.CONFIGMAP.read_text(encoding="utf-8") == expected, "run: python k8s/make_configmap.py"
    assert mk.main(["--check"]) == 0
