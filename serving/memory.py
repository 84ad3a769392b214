"""Where an engine replica's memory goes (issue 16, item 4), measured in the process.

    weights           parameters and buffers of the model (shared storage counted once:
                      a tied LM head, int4 packs beside their dense weights)
    kv_budget         the paged KV pool, allocated up front
    kv_used           the part of it that running sequences hold
    workspace_peak    how far the process's peak RSS rose above what it held once the
                      model and the KV pool were in place: activations, matmul workspaces,
                      allocator slack (CPU torch keeps no allocator statistics; this is the
                      closest measure the OS gives). The peak is reset once loading is
                      done (Linux), so a loading spike does not hide later use
    rss               resident memory of the whole process now

Exported as `inferos:memory_bytes{kind}` by each replica and logged once at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from dataclasses import dataclass

import psutil
from torch import nn


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
    """The process's peak resident set since start or since `reset_peak()`: Linux's VmHWM;
    elsewhere getrusage (KiB on Linux, bytes on macOS), which cannot be reset."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def return_freed_heap() -> int:
    """Give the heap that loading freed back to the OS (glibc `malloc_trim`); bytes of RSS
    returned. Casting and quantizing weights at load free hundreds of MB in small enough
    pieces that glibc keeps them: 400 MB of an int8 replica's RSS, measured. 0 elsewhere."""
    before = rss_bytes()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        return 0
    return max(0, before - rss_bytes())


def reset_peak() -> bool:
    """Start the peak afresh from the current RSS (Linux >= 4.0: clear_refs "5"), so a peak
    reached while loading (fp32 weights cast, quantizing) does not hide later use."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
        baseline = rss_bytes() if reset_peak() else max(peak_rss_bytes(), rss_bytes())
        return cls(weights, kv_budget, baseline)

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
