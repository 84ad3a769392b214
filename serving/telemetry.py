"""Live summaries of the app's own Prometheus metrics, and the optional JSON Lines log.

The merged `/metrics` page is cumulative (counters, histogram buckets). A `MetricsWindow`
keeps a few timestamped snapshots of it and turns the difference between the newest and
one about `window_s` older into what a person watches: tokens/s, TTFT/ITL percentiles
(Prometheus' `histogram_quantile` rule), KV bytes per level, per-replica utilisation, spec
acceptance. The control API's `GET /v1/metrics`, the web console and the telemetry file
all read this one summary. Pure: no Ray, no HTTP.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import KV_LEVELS, P

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every sample of one exposition page, keyed by (sample name, sorted labels)."""

    time_s: float
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, time_s: float) -> Snapshot:
        samples: dict[tuple[str, Labels], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith(P):
                    samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return cls(time_s, samples)

    def sum(self, name: str, by: str | None = None) -> dict[str, float]:
        """Values of `name` summed over every label except `by` (key "" when by is None)."""
        out: dict[str, float] = {}
        for (n, labels), v in self.samples.items():
            if n == P + name and not math.isnan(v):
                key = dict(labels).get(by, "") if by else ""
                out[key] = out.get(key, 0.0) + v
        return out

    def total(self, name: str) -> float:
        return self.sum(name).get("", 0.0)

    def by_replica(self, name: str) -> dict[str, float]:
        """Per `role/replica` values of `name`."""
        out: dict[str, float] = {}
        for (n, labels), v in self.samples.items():
            if n == P + name:
                d = dict(labels)
                key = f"{d.get('role', '')}/{d.get('replica', '')}"
                out[key] = out.get(key, 0.0) + v
        return out

    def info_by_replica(self, name: str, label: str) -> dict[str, str]:
        """Per `role/replica` value of `label` on the samples of info gauge `name` set to 1."""
        out: dict[str, str] = {}
        for (n, labels), v in self.samples.items():
            if n == P + name and v == 1:
                d = dict(labels)
                out[f"{d.get('role', '')}/{d.get('replica', '')}"] = d.get(label, "")
        return out

    def by_replica_and(self, name: str, label: str) -> dict[str, dict[str, float]]:
        """Per `role/replica`, the values of `name` by `label` (e.g. memory_bytes by kind)."""
        out: dict[str, dict[str, float]] = {}
        for (n, labels), v in self.samples.items():
            if n == P + name:
                d = dict(labels)
                key = f"{d.get('role', '')}/{d.get('replica', '')}"
                out.setdefault(key, {})[d.get(label, "")] = v
        return out

    def max(self, name: str) -> float | None:
        vals = [v for (n, _), v in self.samples.items() if n == P + name and not math.isnan(v)]
        return max(vals) if vals else None


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' rule: linear interpolation inside the bucket holding rank q·count;
    the +Inf bucket answers with the highest finite bound. None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    prev_le, prev_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank and count > prev_count:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = (le if not math.isinf(le) else prev_le), count
    return prev_le


def _bucket_deltas(new: Snapshot, old: Snapshot, name: str) -> dict[float, float]:
    cur, base = new.sum(name + "_bucket", by="le"), old.sum(name + "_bucket", by="le")
    return {float(le): max(0.0, v - base.get(le, 0.0)) for le, v in cur.items()}


def _rate(new: Snapshot, old: Snapshot, name: str, dt: float) -> float:
    return max(0.0, new.total(name) - old.total(name)) / dt


def _quantiles(new: Snapshot, old: Snapshot, name: str) -> dict[str, float | None]:
    deltas = _bucket_deltas(new, old, name)
    return {"p50": histogram_quantile(0.5, deltas), "p95": histogram_quantile(0.95, deltas)}


def summarize(new: Snapshot, old: Snapshot) -> dict:
    """What changed between two snapshots of the same app (old taken first)."""
    dt = new.time_s - old.time_s
    if dt <= 0:
        raise ValueError("snapshots must be in time order")
    busy_new = new.by_replica("engine_step_seconds_sum")
    busy_old = old.by_replica("engine_step_seconds_sum")
    running, waiting = (
        new.by_replica("num_requests_running"),
        new.by_replica("num_requests_waiting"),
    )
    usage = new.by_replica("kv_cache_usage_perc")
    providers = new.info_by_replica("execution_provider_info", "provider")
    memory = new.by_replica_and("memory_bytes", "kind")
    replicas = {
        key: {
            "utilisation": min(1.0, max(0.0, busy_new[key] - busy_old.get(key, 0.0)) / dt),
            "num_running": running.get(key, 0.0),
            "num_waiting": waiting.get(key, 0.0),
            "kv_cache_usage": usage.get(key, 0.0),
            "execution_provider": providers.get(key),
            "memory_bytes": memory.get(key, {}),
        }
        for key in sorted(busy_new)
    }
    drafted = new.total("spec_decode_num_draft_tokens_total") - old.total(
        "spec_decode_num_draft_tokens_total"
    )
    accepted = new.total("spec_decode_num_accepted_tokens_total") - old.total(
        "spec_decode_num_accepted_tokens_total"
    )
    kv_bytes, kv_blocks = (
        new.sum("kv_bytes_per_level", "level"),
        new.sum("kv_blocks_per_level", "level"),
    )
    return {
        "window_s": round(dt, 3),
        "tokens_per_s": _rate(new, old, "generation_tokens_total", dt),
        "prompt_tokens_per_s": _rate(new, old, "prompt_tokens_total", dt),
        "requests_per_s": _rate(new, old, "request_success_total", dt),
        "ttft_s": _quantiles(new, old, "time_to_first_token_seconds"),
        "itl_s": _quantiles(new, old, "inter_token_latency_seconds"),
        "e2e_s": _quantiles(new, old, "e2e_request_latency_seconds"),
        "num_requests_running": sum(running.values()),
        "num_requests_waiting": sum(waiting.values()),
        "kv_bytes_per_level": {lv: kv_bytes.get(lv, 0.0) for lv in KV_LEVELS},
        "kv_blocks_per_level": {lv: kv_blocks.get(lv, 0.0) for lv in KV_LEVELS},
        "kv_store_bytes": new.total("kv_store_bytes"),
        "replicas": replicas,
        "spec_decode": {
            "draft_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted > 0 else None,
        },
        "delta_ppl_estimate": new.max("kv_delta_ppl_estimate"),
    }


class MetricsWindow:
    """Snapshots of the last `window_s` seconds, plus the newest one before them (so a
    caller that polls rarely still gets a rate over its own polling period)."""

    def __init__(self, window_s: float = 5.0, start_s: float | None = None):
        self.window_s = window_s
        # the empty page at start: the first summary covers everything since then
        self.snapshots: deque[Snapshot] = deque(
            [Snapshot(time.time() if start_s is None else start_s)]
        )

    def add(self, snap: Snapshot) -> None:
        if snap.time_s <= self.snapshots[-1].time_s:
            return  # two callers in the same instant: keep the first
        self.snapshots.append(snap)
        horizon = snap.time_s - self.window_s
        while len(self.snapshots) > 2 and self.snapshots[1].time_s <= horizon:
            self.snapshots.popleft()

    def summary(self) -> dict:
        if len(self.snapshots) < 2:
            raise ValueError("add a snapshot first")
        return summarize(self.snapshots[-1], self.snapshots[0])


class TelemetryWriter:
    """Appends one JSON object per line to `<directory>/metrics_<start>_<replica>.jsonl`."""

    def __init__(self, directory: str | Path, model: str, replica: str):
        self.model = model
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"metrics_{stamp}_{replica[:8]}.jsonl"

    def write(self, summary: dict, policy: dict | None = None) -> dict:
        row = telemetry_row(summary, self.model, policy)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row


def telemetry_row(summary: dict, model: str, policy: dict | None = None) -> dict:
    """The flat record of one telemetry line (the issue's fields, named with units)."""
    utilisation = {k: round(r["utilisation"], 4) for k, r in summary["replicas"].items()}
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "model": model,
        "tps": round(summary["tokens_per_s"], 3),
        "ttft_p50_s": summary["ttft_s"]["p50"],
        "ttft_p95_s": summary["ttft_s"]["p95"],
        "itl_p95_s": summary["itl_s"]["p95"],
        "e2e_p95_s": summary["e2e_s"]["p95"],
        "num_requests_running": summary["num_requests_running"],
        "num_requests_waiting": summary["num_requests_waiting"],
        "kv_bytes_per_level": summary["kv_bytes_per_level"],
        "kv_blocks_per_level": summary["kv_blocks_per_level"],
        "utilisation": utilisation,
        "spec_acceptance_rate": summary["spec_decode"]["acceptance_rate"],
        "delta_ppl_estimate": summary["delta_ppl_estimate"],
        "policy": policy,
    }
