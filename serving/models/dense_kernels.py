"""Dense matmuls at this machine's speed: per linear shape, from which batch size on fp32
beats the model's dtype, measured once per machine and kept on disk.

A bf16 matmul is fast where the CPU multiplies bf16 natively (AMX, AVX-512-BF16) and slow
where it is emulated: on an AVX2-only CPU (AMD EPYC, 2 threads, SmolLM2's shapes) a bf16
matmul of 32 rows costs 2-3x its fp32 twin, the LM head at 64 rows 4x. Small batches read
weights more than they compute, so there bf16 (half the bytes) or the int4 path wins. So
each linear layer keeps an fp32 copy of its weight wherever the measurement says fp32 wins
from some batch size on, and switches at that size (`fp32_min_tokens`).

The thresholds live in `$INFEROS_HOME/kernels.json` keyed by CPU, torch version, threads,
dtype and shape, measured under a file lock: every process of a machine (prefill, decode,
draft, the vLLM hand-over) then runs the same kernels, so the same batch gives the same
numbers in each of them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from serving.env import inferos_home

logger = logging.getLogger(__name__)

# batch sizes (tokens per step) measured; a step larger than the last uses its verdict
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NEVER = 1 << 30  # fp32_min_tokens of a shape where fp32 never wins
_REPEATS = 5
CLEAR_WIN = 1.25  # fp32 at least this much faster: no need to measure larger buckets


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa() -> str:
    """What the CPU multiplies with, as torch sees it: the model name alone does not tell
    (an "AMD EPYC" VM may be a Zen 3 with AVX2 only or a Zen 4 with AVX-512-BF16)."""
    from serving.config import cpu_has_native_bf16

    native = "native bf16" if cpu_has_native_bf16() else "emulated bf16"
    return f"{torch.backends.cpu.get_cpu_capability()}, {native}"


def cache_key(dtype: torch.dtype, n: int, k: int) -> str:
    threads = torch.get_num_threads()
    return f"{_cpu_name()} ({_isa()})|torch {torch.__version__}|{threads} threads|{dtype}|{n}x{k}"


def _median_s(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first-call allocations and primitive creation
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Larger than most CPUs' last-level cache we run on (32 MiB on the Zen 4 EPYC): written
# before each timed run, it evicts the weights a kernel is measured with.
EVICT_BYTES = 64 * 2**20
_evict_buffer: torch.Tensor | None = None


def _evict_caches() -> None:
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = torch.zeros(EVICT_BYTES // 4)
    _evict_buffer.add_(1.0)


def last_level_cache_bytes() -> int:
    """The largest CPU cache the OS reports (0 where it reports none). A VM may report a
    host's whole L3 (300 MB on the AMX Xeon VM): more than `EVICT_BYTES` evicts."""
    largest = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        scale = units.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in units else text
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest


def fastest_s(
    fn: Callable[[], object], repeats: int = 7, evict: Callable[[], object] = _evict_caches
) -> float:
    """The fastest of a few runs of `fn` (after a warm-up), each started with cold caches
    (`evict`): interference from other work only ever adds time, so the minimum is the least
    noisy estimate on a shared box; and in a model's forward pass every layer's weights come
    from memory (SmolLM2's 270 MB against a 32 MB L3), so a layer timed with its weights hot
    in cache flatters the kernel that reads more bytes (bf16 against int4: hot, bf16 won
    from 2 tokens; the engine's single-stream speculative steps then slowed 8.7 -> 11.6 ms)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        evict()
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def largest_winning_bucket(
    buckets: tuple[int, ...],
    in_features: int,
    dtype: torch.dtype,
    fast: Callable[[torch.Tensor], object],
    dense: Callable[[torch.Tensor], object],
    evict_bytes: int = EVICT_BYTES,
    margin: float = 1.0,
) -> int:
    """The largest of `buckets` (row counts, ascending) up to which `fast` beats `dense` at
    every bucket by `margin` (fast's time x margin < dense's), timed on random
    `[rows, in_features]` inputs with `evict_bytes` written before each run; 0 if it never
    does."""
    evict: Callable[[], object] = _evict_caches
    if evict_bytes > EVICT_BYTES:
        big = torch.zeros(evict_bytes // 4)  # freed on return: only this measurement needs it
        evict = lambda: big.add_(1.0)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    best = 0
    for rows in buckets:
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        fast_s = fastest_s(lambda x=x: fast(x), evict=evict)
        if fast_s * margin >= fastest_s(lambda x=x: dense(x), evict=evict):
            break
        best = rows
    return best


def measure_fp32_min_tokens(n: int, k: int, dtype: torch.dtype) -> int:
    """The smallest bucket from which an fp32 matmul `[m, k] x [k, n]` (inputs cast in and
    out) is faster than one in `dtype` at every larger bucket; NEVER if none.

    Once fp32 wins clearly (by CLEAR_WIN) at two buckets in a row the matmul is compute
    bound and stays so at larger sizes, so the sweep stops there: the large buckets of an
    emulated bf16 LM head alone would take most of a minute."""
    gen = torch.Generator().manual_seed(0)
    w32 = torch.randn(n, k, generator=gen)
    w = w32.to(dtype)
    fp32_wins: list[bool] = []
    clear_in_a_row = 0
    for m in BUCKETS:
        x = torch.randn(m, k, generator=gen).to(dtype)
        t_dtype = _median_s(lambda x=x: F.linear(x, w))
        t_fp32 = _median_s(lambda x=x: F.linear(x.float(), w32).to(dtype))
        fp32_wins.append(t_fp32 < t_dtype)
        clear_in_a_row = clear_in_a_row + 1 if t_fp32 * CLEAR_WIN < t_dtype else 0
        if clear_in_a_row == 2:
            break
    threshold = NEVER
    for m, wins in zip(reversed(BUCKETS[: len(fp32_wins)]), reversed(fp32_wins), strict=True):
        if not wins:
            break
        threshold = m
    return threshold


def fp32_thresholds(shapes: set[tuple[int, int]], dtype: torch.dtype) -> dict[tuple[int, int], int]:
    """`fp32_min_tokens` per (out, in) shape: from the machine's cache file, measuring (under
    its lock, so that two processes never measure at once or disagree) what it lacks.

    Where the CPU multiplies bf16 natively, bf16 never loses to fp32 (half the bytes, and
    no slower per flop), so nothing is measured: measured under load, a noisy run once chose
    fp32 from 1 token for SmolLM2's down_proj on a Zen 4 EPYC, where bf16 is 1-4x faster at
    every batch size (medians of 50, 2 threads)."""
    from serving.config import cpu_has_native_bf16

    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        logger.info("dense kernels: native bf16 on this CPU, no fp32 switch")
        return dict.fromkeys(shapes, NEVER)
    keys = {(n, k): cache_key(dtype, n, k) for n, k in shapes}
    measures = {
        keys[(n, k)]: (lambda n=n, k=k: measure_fp32_min_tokens(n, k, dtype)) for n, k in shapes
    }
    known = measured_once(measures, "dense kernels")
    return {shape: known[key] for shape, key in keys.items()}


def measured_once(measures: dict[str, Callable[[], int]], what: str) -> dict[str, int]:
    """The value of each key: from the machine's cache file (`$INFEROS_HOME/kernels.json`),
    measuring what it lacks under its lock, so that two processes never measure at once
    (each would slow the other's timings) or end up disagreeing."""
    path = inferos_home() / "kernels.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = json.loads(path.read_text()) if path.exists() else {}
        for key, measure in sorted(measures.items()):
            if key not in known:
                started = time.perf_counter()
                known[key] = measure()
                logger.info(
                    "%s %s: %s (measured in %.1f s)",
                    what,
                    key,
                    known[key] if known[key] < NEVER else "never",
                    time.perf_counter() - started,
                )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        tmp.replace(path)
    return {key: known[key] for key in measures}


# The row count oneDNN tunes a prepacked weight's layout for; any other count runs on it too
# (a decode batch of 8-64 rows is where prepacking gains most).
PACK_ROWS_HINT = 32


def prepack_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight [out, in]` (bf16) reordered once into oneDNN's blocked layout for
    `torch.ops.mkldnn._linear_pointwise`, or None where that path is missing or bf16 is not
    native. F.linear reorders the weight on every call: prepacked, the same oneDNN kernel
    gives bit-identical results (checked at 9-512 rows on every SmolLM2 shape) 1.1-2x
    faster at decode batch sizes (Zen 4, 2 threads: the LM head at 9 rows 4.2 -> 2.0 ms,
    gate_up at 32 rows 0.43 -> 0.33 ms), level at 512-token prefill chunks."""
    from serving.config import cpu_has_native_bf16

    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return None
    if not (torch.backends.mkldnn.is_available() and cpu_has_native_bf16()):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
    except (RuntimeError, AttributeError):  # an older torch, or oneDNN refused the shape
        return None


class DenseLinear(nn.Module):
    """A linear layer that runs in bf16 below `fp32_min_tokens` rows and in fp32 from there,
    whatever the model's dtype: a bf16 model keeps an fp32 copy of the weight (made from
    the source weight as loaded, where given), an fp32 one a bf16 copy; only the copy the
    measurement calls for is made. `weight` stays the model's own (tied embeddings, the
    speculative draft's vocabulary slice read it)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fp32_min_tokens: int,
        source: torch.Tensor | None = None,
    ):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.bias = bias
        self.fp32_min_tokens = fp32_min_tokens
        self.weight16: torch.Tensor | None = None  # [out, in] bf16, below the threshold
        self.bias16: torch.Tensor | None = None
        self.weight32: torch.Tensor | None = None  # [out, in] fp32, from the threshold on
        self.bias32: torch.Tensor | None = None
        detached = bias.detach() if bias is not None else None
        if weight.dtype == torch.float32:
            if fp32_min_tokens > 1:
                self.weight16 = weight.detach().to(torch.bfloat16)
                self.bias16 = None if detached is None else detached.to(torch.bfloat16)
        elif fp32_min_tokens < NEVER:
            self.weight32 = (source if source is not None else weight.detach()).float()
            self.bias32 = None if detached is None else detached.float()
        # the bf16 path's weight, reordered once into oneDNN's blocked layout
        bf16_weight = self.weight16 if self.weight16 is not None else weight.detach()
        self.bias_packed = self.bias16 if self.weight16 is not None else detached
        self.packed16 = prepack_bf16(bf16_weight) if fp32_min_tokens > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.fp32_min_tokens:
            w, b = self.weight32, self.bias32
        elif self.packed16 is not None and x.dim() == 2 and x.shape[0] > 0:
            x16 = x.to(torch.bfloat16).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(
                x16, self.packed16, self.bias_packed, "none", [], ""
            )
            return out.to(x.dtype)
        else:
            w, b = self.weight16, self.bias16
        if w is None:  # the model's own dtype is the right one here
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def use_measured_dense(model: nn.Module, source_weights: dict[str, torch.Tensor]) -> int:
    """Give every plain linear layer (and the dense path of every int4 one in a bf16 model)
    the measured bf16/fp32 switch; fp32 copies are made from `source_weights` (as loaded,
    before the cast) where present. Returns how many layers switch at some size."""
    from serving.models.int4 import HybridInt4Linear

    layers: list[tuple[str, nn.Module, str, nn.Module]] = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            fp32_int4 = isinstance(child, HybridInt4Linear) and child.weight.dtype == torch.float32
            if type(child) is nn.Linear or (isinstance(child, HybridInt4Linear) and not fp32_int4):
                layers.append((parent_name, parent, name, child))
    if not layers:
        return 0
    shapes = {tuple(c.weight.shape) for *_, c in layers}
    thresholds = fp32_thresholds(shapes, torch.bfloat16)
    switched = 0
    for parent_name, parent, name, child in layers:
        key = f"{parent_name}.{name}.weight" if parent_name else f"{name}.weight"
        threshold = thresholds[tuple(child.weight.shape)]
        dense = DenseLinear(child.weight, child.bias, threshold, source_weights.get(key))
        if isinstance(child, HybridInt4Linear):
            child.dense = dense
        else:
            setattr(parent, name, dense)
        switched += dense.weight16 is not None or dense.weight32 is not None
    logger.info(
        "dense kernels: %d of %d linear layers switch between bf16 and fp32", switched, len(layers)
    )
    return switched
