"""Every Prometheus instrument of Infer-OS Serve, in one place.

Names follow vLLM's (`vllm:` → `inferos:`) where the meaning is the same, with vLLM's
bucket boundaries so its dashboards transfer. Each process owns a registry; replicas push
their exposition text to the scheduler actor and the ingress merges all of them into one
`/metrics` page (`merge_expositions`). Labels stay bounded: model, role, replica.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.api.errors import ERROR_STATUSES

MEMORY_KINDS = ("weights", "kv_budget", "kv_used", "workspace_peak", "rss")  # serving/memory.py

P = "inferos:"
# fmt: off
# vLLM's bucket boundaries, so dashboards built for vLLM read ours unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096)
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
                        2.56)
# fmt: on
LABELS = ("model", "role", "replica")
# The staged-KV levels (ARCHITECTURE.md): L0 full precision, L1 int8, L2 int4, L3 spilled.
KV_LEVELS = ("L0", "L1", "L2", "L3")


class _Instruments:
    def __init__(self, model: str, role: str, replica: str):
        self.registry = CollectorRegistry()
        self.labels = {"model": model, "role": role, "replica": replica}

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(P + name, doc, LABELS + extra, registry=self.registry)

    def _gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(P + name, doc, LABELS + extra, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(P + name, doc, LABELS, buckets=buckets, registry=self.registry)

    def _kv_level_instruments(self) -> None:
        """Staged KV: blocks and bytes per level, all present (at 0) from the start, and
        the demotion/promotion/spill counters; engines and the store both export them."""
        lb = self.labels
        blocks = self._gauge("kv_blocks_per_level", "KV blocks held at each level.", ("level",))
        nbytes = self._gauge("kv_bytes_per_level", "KV bytes held at each level.", ("level",))
        self.blocks_per_level = {lv: blocks.labels(**lb, level=lv) for lv in KV_LEVELS}
        self.bytes_per_level = {lv: nbytes.labels(**lb, level=lv) for lv in KV_LEVELS}
        for lv in KV_LEVELS:
            self.blocks_per_level[lv].set(0)
            self.bytes_per_level[lv].set(0)
        self.demotions = self._counter(
            "kv_demotions", "KV blocks moved to a lower-precision level."
        ).labels(**lb)
        self.promotions = self._counter(
            "kv_promotions", "KV blocks restored to a higher-precision level."
        ).labels(**lb)
        self.spills = self._counter("kv_spills", "KV blocks written to the spill tier.").labels(
            **lb
        )

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class FrontendMetrics(_Instruments):
    """Request-level metrics, measured where the client's stream is (the ingress)."""

    def __init__(self, model: str, replica: str):
        super().__init__(model, "ingress", replica)
        lb = self.labels
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        ).labels(**lb)
        self.itl = self._histogram(
            "inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS
        ).labels(**lb)
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS
        ).labels(**lb)
        self.prompt_tokens = self._counter("prompt_tokens", "Prefill tokens processed.").labels(
            **lb
        )
        self.generation_tokens = self._counter(
            "generation_tokens", "Generation tokens processed."
        ).labels(**lb)
        self._success = self._counter(
            "request_success", "Successfully finished requests.", ("finished_reason",)
        )
        self._errors = self._counter(
            "request_errors", "Requests answered with an error, by HTTP status.", ("code",)
        )
        for status in ERROR_STATUSES:  # every series at 0 from the start, for dashboards
            self._errors.labels(**lb, code=str(status))
        self.in_flight = self._gauge(
            "ingress_requests_in_flight", "Requests admitted by the ingress."
        ).labels(**lb)
        self.stream_resumes = self._counter(
            "stream_resumes",
            "Streams resumed on another decode replica after theirs died.",
        ).labels(**lb)

    def success(self, finished_reason: str) -> None:
        self._success.labels(**self.labels, finished_reason=finished_reason).inc()

    def error(self, status_code: int) -> None:
        self._errors.labels(**self.labels, code=str(status_code)).inc()


class EngineMetrics(_Instruments):
    """Engine-level metrics of one prefill or decode replica."""

    def __init__(self, model: str, role: str, replica: str):
        super().__init__(model, role, replica)
        lb = self.labels
        self.running = self._gauge(
            "num_requests_running", "Requests in the engine's batch."
        ).labels(**lb)
        self.waiting = self._gauge(
            "num_requests_waiting", "Requests waiting for the engine."
        ).labels(**lb)
        self.kv_usage = self._gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).labels(**lb)
        self.kv_blocks_used = self._gauge("kv_cache_blocks_used", "KV blocks in use.").labels(**lb)
        self.kv_blocks_total = self._gauge(
            "kv_cache_blocks_total", "KV blocks in the pool."
        ).labels(**lb)
        self.iteration_tokens = self._histogram(
            "iteration_tokens_total", "Tokens computed per engine step.", ITERATION_TOKENS_BUCKETS
        ).labels(**lb)
        self.batch_size = self._histogram(
            "engine_batch_size", "Sequences per engine step.", ITERATION_TOKENS_BUCKETS
        ).labels(**lb)
        self.step_seconds = self._histogram(
            "engine_step_seconds", "Duration of one engine step.", STEP_SECONDS_BUCKETS
        ).labels(**lb)
        self.preemptions = self._counter("num_preemptions", "Sequences preempted.").labels(**lb)
        # the engine's own prefix cache (vLLM's prefix_cache_* are the kv_store's here, which
        # came first): hit rate = hits / queries, in tokens
        self.prefix_cache_queries = self._counter(
            "engine_prefix_cache_queries", "Prompt tokens looked up in the engine's prefix cache."
        ).labels(**lb)
        self.prefix_cache_hits = self._counter(
            "engine_prefix_cache_hits", "Prompt tokens whose KV the engine's prefix cache held."
        ).labels(**lb)
        self._kv_level_instruments()
        self.kv_transfer_bytes = self._counter(
            "kv_transfer_bytes", "KV bytes exported to or imported from the store."
        ).labels(**lb)
        # Speculative decoding, vLLM's names: acceptance rate = accepted / draft tokens.
        # They exist (at 0) from the start so dashboards and alerts find the series.
        self.spec_num_drafts = self._counter(
            "spec_decode_num_drafts", "Speculative drafts proposed (one per sequence and step)."
        ).labels(**lb)
        self.spec_num_draft_tokens = self._counter(
            "spec_decode_num_draft_tokens", "Draft tokens proposed."
        ).labels(**lb)
        self.spec_num_accepted_tokens = self._counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted by the target model."
        ).labels(**lb)
        self._spec_accepted_per_pos = self._counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the draft.",
            ("position",),
        )
        self.fallbacks = self._counter(
            "policy_fallbacks", "Fallbacks to a safer path (execution provider, KV level, ...)."
        ).labels(**lb)
        self._provider = self._gauge(
            "execution_provider_info",
            "1 for the execution provider this replica runs on.",
            ("provider",),
        )
        self.execution_provider("torch-cpu")
        self._memory = self._gauge(
            "memory_bytes",
            "Bytes of this replica's memory by kind: weights, kv_budget, kv_used, "
            "workspace_peak (peak RSS above the loaded state), rss.",
            ("kind",),
        )
        self.memory({kind: 0 for kind in MEMORY_KINDS})  # every kind exists from the start

    def memory(self, sample: dict[str, int]) -> None:
        for kind, n in sample.items():
            self._memory.labels(**self.labels, kind=kind).set(n)

    def spec_accepted_at(self, position: int, n: int = 1) -> None:
        """Count `n` accepted draft tokens at draft position `position` (0-based)."""
        self._spec_accepted_per_pos.labels(**self.labels, position=str(position)).inc(n)

    def execution_provider(self, provider: str) -> None:
        """Mark `provider` (e.g. torch-cpu, torch-cuda, onnx-dml) as the one in use."""
        self._provider.clear()
        self._provider.labels(**self.labels, provider=provider).set(1)


class StoreMetrics(_Instruments):
    def __init__(self, model: str):
        super().__init__(model, "kv_store", "0")
        lb = self.labels
        self.sequences = self._gauge(
            "kv_store_sequences", "Sequences whose KV the store holds."
        ).labels(**lb)
        self.blocks = self._gauge("kv_store_blocks", "KV blocks referenced by the store.").labels(
            **lb
        )
        self.bytes = self._gauge("kv_store_bytes", "KV bytes referenced by the store.").labels(**lb)
        self.evictions = self._counter(
            "kv_store_evictions", "Sequences dropped for the memory or disk budget, or a full disk."
        ).labels(**lb)
        self.released = self._counter(
            "kv_store_released",
            "Sequences dropped because nothing needs them any more (a later turn holds all "
            "their blocks, or idle past kv_cache.store_ttl_s and never re-used).",
        ).labels(**lb)
        self.disk_bytes = self._gauge(
            "kv_store_disk_bytes",
            "Bytes the store has in its spill directory (at most kv_cache.spill_budget_bytes).",
        ).labels(**lb)
        self.spill_failures = self._counter(
            "kv_store_spill_failures",
            "Writes to the spill directory refused for the disk budget or failed (full disk).",
        ).labels(**lb)
        self._kv_level_instruments()
        # vLLM's prefix-cache counters (in tokens): hit rate = hits / queries
        self.prefix_queries = self._counter(
            "prefix_cache_queries", "Prompt tokens looked up in the stored KV."
        ).labels(**lb)
        self.prefix_hits = self._counter(
            "prefix_cache_hits", "Prompt tokens whose KV was found stored."
        ).labels(**lb)
        self.delta_ppl_estimate = self._gauge(
            "kv_delta_ppl_estimate",
            "Estimated perplexity increase caused by lossy KV levels (NaN until estimated).",
        ).labels(**lb)
        self.delta_ppl_estimate.set(math.nan)


class SchedulerMetrics(_Instruments):
    def __init__(self, model: str):
        super().__init__(model, "scheduler", "0")
        lb = self.labels
        self._decisions = self._counter(
            "routing_decisions", "Routing decisions by kind.", ("decision",)
        )

        self._fallbacks = self._counter(
            "policy_fallbacks", "Fallbacks to baseline behaviour on an anomaly."
        )
        self.fallback_active = self._gauge(
            "policy_fallback_active", "1 while the app runs in fallback (baseline) mode."
        ).labels(**lb)
        self.fallback_active.set(0)
        self._actions = self._counter(
            "control_actions", "Policy changes made by the control loops, by field.", ("field",)
        )

    def decision(self, kind: str) -> None:
        self._decisions.labels(**self.labels, decision=kind).inc()

    def fallback(self, reason: str) -> None:
        self._fallbacks.labels(**self.labels).inc()
        self.fallback_active.set(1)

    def control_action(self, field: str) -> None:
        self._actions.labels(**self.labels, field=field).inc()


def merge_expositions(texts: Iterable[str]) -> str:
    """Merge several processes' exposition texts into one valid page (one HELP/TYPE per family)."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created") or fam.name.startswith("python_"):
                continue
            # the parser strips a counter's `_total`; the exposition's TYPE line keeps it
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            _, _, lines = families.setdefault(name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(s.labels.items()))
                lines.append(f"{s.name}{{{labels}}} {_fmt(s.value)}")
    out = []
    for name, (typ, doc, lines) in sorted(families.items()):
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {typ}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))
