"""Where an engine replica's memory goes (issue 16, item 4), measured in the process.

    weights           parameters and buffers of the model (shared storage counted once:
                      a tied LM head, int4 packs beside their dense weights)
    kv_budget         the paged KV pool, allocated up front
    kv_used           the part of it that running sequences hold
    workspace_peak    how far the process's peak RSS rose above what it held once the
                      model and the KV pool were in place: activations, matmul workspaces,
                      allocator slack (CPU torch keeps no allocator statistics; this is the
                      closest measure the OS gives). A peak reached while loading (e.g.
                      quantizing) hides any later use below it: 0 then means "no higher"
    rss               resident memory of the whole process now

Exported as `inferos:memory_bytes{kind}` by each replica and logged once at start-up.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import psutil
from torch import nn

from serving.metrics import MEMORY_KINDS

KINDS = MEMORY_KINDS  # each sample has every kind


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers, each storage once."""
    seen: set[int] = set()
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def peak_rss_bytes() -> int:
    """The process's peak resident set (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@dataclass(slots=True)
class MemoryAccount:
    """Fixed parts measured once after loading; the rest read on each `sample()`."""

    weights: int
    kv_budget: int
    baseline_peak_rss: int  # peak RSS once the model and the KV pool were in place

    @classmethod
    def after_load(cls, model: nn.Module | None, kv_budget: int) -> MemoryAccount:
        weights = tensor_bytes(model) if model is not None else 0
        return cls(weights, kv_budget, max(peak_rss_bytes(), rss_bytes()))

    def sample(self, kv_used: int) -> dict[str, int]:
        """`kv_used`: bytes of the pool's budget in use (blocks and quantized units)."""
        return {
            "weights": self.weights,
            "kv_budget": self.kv_budget,
            "kv_used": kv_used,
            "workspace_peak": max(0, peak_rss_bytes() - self.baseline_peak_rss),
            "rss": rss_bytes(),
        }


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def summary_line(role: str, replica: str, sample: dict[str, int]) -> str:
    return (
        f"memory of {role} replica {replica}: weights {mib(sample['weights'])}, KV budget "
        f"{mib(sample['kv_budget'])}, process RSS {mib(sample['rss'])}"
    )


def model_of(engine: object) -> nn.Module | None:
    """The torch model of an engine's runner, if it has one (other backends: None)."""
    model = getattr(getattr(engine, "runner", None), "model", None)
    return model if isinstance(model, nn.Module) else None

