"""`inferos serve --dry-run`: what each replica would hold, checked against this machine's
memory before anything starts (issue 16, item 4).

Per engine replica: its device (what the role asks of Ray; CPU otherwise), the bytes of its
weights (tensor shapes from the safetensors headers, at the serving dtype, times the
format's factor for the quantized copies kept beside the dense weights), of its KV pool
(`kv_cache.num_blocks` blocks of the model's layout) and a workspace allowance (activations
of one step of `max_num_batched_tokens`). Plus the KV store's memory budget, once. A plan
larger than the memory available is refused with what to change.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

from serving.backends.placement import one_engine_per_node
from serving.config import InferosConfig
from serving.kv.block_format import KVLayout

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Quantized copies kept beside the dense weights (serving/models/weight_formats.py: int8
# codes, int4 packs, the Q8 head), measured on the default model (memory_bytes weights over
# bf16's: benchmarks/results/2026-12-05/memory); "auto" adds the int4 repack only for
# GGUF-grid weights, which the plan cannot see from the folder, so it counts them as there.
# The int4 codes a byte each (`serving/kernels/q4_linear.py`) and int4's qkv at int8 added
# 0.245 (auto) and 0.208 (int4) of the bf16 bytes (`memory.tensor_bytes` of the loaded
# model before and after, 2026-12-06). On a CPU with AMX (or, since, AVX-512 VNNI) the int4
# layers keep nibble packs for the W4A8 kernel beside the byte codes
# (`serving/models/int4.py`, EXACT_ROWS): +0.196 (auto) and +0.165 (int4) of the bf16 bytes
# more (nibbles a quarter of bf16's bytes, over the int4 layers' share; the scales are
# shared). The exact kernel's codes have since gone to two a byte (half of the byte codes'
# share above): the figures are upper bounds now.
FORMAT_EXTRA = {"bf16": 0.0, "auto": 0.81, "int8": 0.56, "int4": 0.74}
WORKSPACE_FLOATS_PER_TOKEN = 16  # hidden-size multiples alive in one layer of one step
FITS_FRACTION = 0.9  # of the available memory: the OS, Ray and the ingress need the rest


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    role: str
    count: int
    device: str
    weights: int
    kv_budget: int
    workspace: int

    @property
    def each(self) -> int:
        return self.weights + self.kv_budget + self.workspace


@dataclass(frozen=True, slots=True)
class Plan:
    replicas: list[ReplicaPlan]
    kv_store_budget: int
    available: int

    @property
    def total(self) -> int:
        return sum(r.each * r.count for r in self.replicas) + self.kv_store_budget

    def refusal(self) -> str | None:
        """Why this plan cannot run here, with what to change; None when it fits."""
        limit = int(self.available * FITS_FRACTION)
        if self.total <= limit:
            return None
        biggest = max(self.replicas, key=lambda r: r.kv_budget * r.count, default=None)
        hint = (
            f"lower kv_cache.num_blocks (the {biggest.role} KV pool is "
            f"{gib(biggest.kv_budget)} per replica), "
            if biggest
            else ""
        )
        return (
            f"this config needs about {gib(self.total)} but {gib(limit)} is usable here "
            f"({FITS_FRACTION:.0%} of {gib(self.available)} available): {hint}fewer replicas, "
            f"kv_cache.store_budget_bytes below {gib(self.kv_store_budget)}, or model.weights "
            "int8/int4"
        )

    def table(self) -> str:
        rows = [f"{'replica':<10}{'x':>3}  {'device':<12}{'weights':>11}{'KV pool':>11}"
                f"{'workspace':>11}{'each':>11}"]  # fmt: skip
        for r in self.replicas:
            rows.append(
                f"{r.role:<10}{r.count:>3}  {r.device:<12}{gib(r.weights):>11}"
                f"{gib(r.kv_budget):>11}{gib(r.workspace):>11}{gib(r.each):>11}"
            )
        rows.append(f"{'kv_store':<10}{1:>3}  {'cpu':<12}{'':>33}{gib(self.kv_store_budget):>11}")
        rows.append(f"total {gib(self.total)} of {gib(self.available)} available")
        return "\n".join(rows)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def safetensors_numel(folder: Path) -> int:
    """Weights in the folder's safetensors files, from their headers (nothing loaded)."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


def kv_bytes_per_block(cfg: dict, block_size: int, dtype: str) -> int:
    """A block of the engine's layout (`KVLayout`), from a Hugging Face config's names."""
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    layout = KVLayout(
        num_layers=cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg["num_layers"],
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        block_size=block_size,
        dtype=dtype,
    )
    return layout.bytes_per_block()


def role_device(config: InferosConfig, role: str) -> str:
    settings = getattr(config, role)
    if settings.num_gpus:
        return f"gpu x{settings.num_gpus:g}"
    if settings.resources:
        return ",".join(sorted(settings.resources))
    return "cpu"


def make_plan(config: InferosConfig, folder: Path, available: int | None = None) -> Plan:
    config = one_engine_per_node(config, num_nodes=1)  # as `inferos serve` deploys locally
    cfg = json.loads((folder / "config.json").read_text())
    weight_bytes = DTYPE_BYTES.get(config.model_dtype, 4)
    dense = safetensors_numel(folder) * weight_bytes
    weights = int(dense * (1 + FORMAT_EXTRA.get(config.model.weights, 0.0)))
    kv_block = kv_bytes_per_block(cfg, config.kv_cache.block_size, config.kv_dtype)
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or 0
    workspace = config.scheduling.max_num_batched_tokens * hidden * WORKSPACE_FLOATS_PER_TOKEN * 4
    replicas = [
        ReplicaPlan(
            role,
            getattr(config, role).num_replicas,
            role_device(config, role),
            weights,
            config.kv_cache.num_blocks * kv_block,
            workspace,
        )  # fmt: skip
        for role in ("prefill", "decode")
        if getattr(config, role).num_replicas
    ]
    if available is None:
        available = psutil.virtual_memory().available
    return Plan(replicas, config.kv_cache.store_budget_bytes, available)
