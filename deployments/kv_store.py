"""The `kv_store` actor: an index of sequences' KV, held as Ray object refs, in levels.

Producers `ray.put` their blocks and register the refs here; consumers look them up and
read the objects zero-copy from the node's object store. The store keeps refs and
metadata, never a second copy of what it was given.

Staged KV (ARCHITECTURE.md levels): beyond `kv_cache.store_budget_bytes` the least recently
used sequences are first *demoted* (their unpinned units quantized to the deepest lossy
level the current profile allows, originals written to the spill directory so promotion is
bit-exact), then *spilled* whole to local disk (L3); a spilled sequence is reloaded on its
next access. Nothing is dropped for memory. Full blocks are also indexed by a hash chain
of their tokens, so a prompt that starts with a stored prefix reuses its KV.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from deployments.actors import scheduler_actor
from policies.kv_levels import PROFILES, BlockStats, Level, Profile, assign_levels
from serving.config import InferosConfig
from serving.kv.block_format import KVLayout, KVPayload
from serving.kv.prefix import block_hashes
from serving.kv.quant import QuantizedBlock, quantize_block
from serving.kv.spill import SpillStore
from serving.metrics import StoreMetrics

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Element:
    """One block at L0, or one quantized unit of several blocks at L1/L2."""

    ref: Any  # ObjectRef; None while the sequence is spilled
    level: Level
    num_blocks: int
    num_bytes: int
    meta: dict[str, Any] | None = None  # QuantizedBlock's non-tensor fields, for reloading


@dataclass(slots=True)
class StoredKV:
    layout: KVLayout
    num_tokens: int
    elements: list[Element]
    producer: str
    token_ids: list[int] | None = None
    created_at: float = field(default_factory=time.time)
    consumers: list[str] = field(default_factory=list)
    spilled: bool = False
    disk_bytes: int = 0
    originals: dict[int, int] = field(default_factory=dict)  # first block → element index
    demoted_as: str | None = None  # profile whose deepest level this entry reached

    @property
    def memory_bytes(self) -> int:
        return 0 if self.spilled else sum(e.num_bytes for e in self.elements)

    @property
    def num_blocks(self) -> int:
        return sum(e.num_blocks for e in self.elements)

    def payload(self, num_blocks: int | None = None) -> KVPayload:
        """Refs of the first `num_blocks` blocks (whole elements), all by default."""
        chosen, total = [], 0
        for e in self.elements:
            if num_blocks is not None and total + e.num_blocks > num_blocks:
                break
            chosen.append(e)
            total += e.num_blocks
        tokens = self.num_tokens if num_blocks is None else total * self.layout.block_size
        return KVPayload(
            self.layout,
            min(tokens, self.num_tokens),
            [e.ref for e in chosen],
            spans=[e.num_blocks for e in chosen],
            sizes=[e.num_bytes for e in chosen],
        )


class KVStoreActor:
    def __init__(self, config: dict):
        cfg = InferosConfig.model_validate(config)
        self.config = config
        self.budget_bytes = cfg.kv_cache.store_budget_bytes
        self.unit_tokens = cfg.kv_cache.quant_unit_tokens
        self.default_profile = cfg.kv_cache.profile
        spill_root = cfg.kv_cache.spill_dir or tempfile.mkdtemp(prefix="inferos-store-")
        self.spill = SpillStore(Path(spill_root) / "store")
        self.entries: OrderedDict[str, StoredKV] = OrderedDict()
        self.prefix_index: dict[int, tuple[str, int]] = {}  # chain hash → (key, blocks)
        self.num_puts = 0
        self.num_gets = 0
        self.num_evictions = 0
        self.num_reloads = 0
        self.counts = {"demoted_blocks": 0, "promoted_blocks": 0, "spilled_blocks": 0}
        self.metrics = StoreMetrics(cfg.model.served_model_name or "default")
        # Demotion, spilling and reloading await object reads; one at a time, or two calls
        # interleaving at those awaits would spill a half-spilled sequence.
        self._lock = asyncio.Lock()

    # --- memory ------------------------------------------------------------------------
    @property
    def num_bytes(self) -> int:
        """KV bytes held in memory (spilled sequences and originals are disk)."""
        return sum(e.memory_bytes for e in self.entries.values())

    @property
    def disk_bytes(self) -> int:
        return sum(e.disk_bytes for e in self.entries.values())

    async def _profile(self) -> Profile:
        try:
            policy = await scheduler_actor(self.config).get_policy.remote()
            return PROFILES[policy.kv_profile]
        except Exception:  # no scheduler (unit tests): the configured profile
            return PROFILES[self.default_profile]

    # --- the API -----------------------------------------------------------------------
    async def put(
        self, key: str, payload: KVPayload, producer: str, token_ids: list[int] | None = None
    ) -> None:
        spans = payload.spans or [1] * len(payload.blocks)
        sizes = payload.sizes or [payload.layout.bytes_per_block()] * len(payload.blocks)
        elements = [
            Element(ref, Level.L0 if span == 1 else Level.L1, span, size)
            for ref, span, size in zip(payload.blocks, spans, sizes, strict=True)
        ]
        for e in elements:
            if e.num_blocks > 1:  # a quantized unit from an engine: learn its level
                qb = await e.ref
                e.level = Level.L1 if qb.bits == 8 else Level.L2
        self.entries[key] = StoredKV(payload.layout, payload.num_tokens, elements, producer)
        self.entries.move_to_end(key)
        if token_ids is not None:
            self._index(key, token_ids, payload.layout.block_size)
        self.num_puts += 1
        async with self._lock:
            await self._enforce_budget(keep=key)
        self._update_gauges()

    async def get(self, key: str, consumer: str) -> KVPayload | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        async with self._lock:
            await self._ensure_loaded(key, entry)
        self.entries.move_to_end(key)
        entry.consumers.append(consumer)
        self.num_gets += 1
        self._update_gauges()
        return entry.payload()

    async def match_prefix(
        self, token_ids: list[int], block_size: int, consumer: str
    ) -> KVPayload | None:
        """KV of the longest stored prefix of `token_ids` (whole blocks, whole quantized
        units, and at least one token left to compute), or None."""
        best: tuple[str, int] | None = None
        for h in block_hashes(token_ids[:-1], block_size):
            hit = self.prefix_index.get(h)
            if hit is None:
                break
            best = hit
        self.metrics.prefix_queries.inc(len(token_ids))
        if best is None or best[0] not in self.entries:
            return None
        key, num_blocks = best
        entry = self.entries[key]
        async with self._lock:
            await self._ensure_loaded(key, entry)
        self.entries.move_to_end(key)
        payload = entry.payload(num_blocks)
        if payload.num_tokens == 0:
            return None
        entry.consumers.append(consumer)
        self.metrics.prefix_hits.inc(payload.num_tokens)
        self._update_gauges()
        return payload

    async def drop(self, key: str) -> bool:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.spill.drop(f"{key}/data")
            self.spill.drop(f"{key}/originals")
        self._update_gauges()
        return entry is not None

    async def promote(self, key: str) -> bool:
        """Every demoted unit of `key` back to L0 from its spilled original: bit-exact."""
        async with self._lock:
            return await self._promote(key)

    async def _promote(self, key: str) -> bool:
        entry = self.entries.get(key)
        if entry is None or not entry.originals:
            return False
        await self._ensure_loaded(key, entry)
        originals = self.spill.get_tensors(f"{key}/originals")
        out: list[Element] = []
        first = 0
        for e in entry.elements:
            if e.level in (Level.L1, Level.L2) and str(first) in originals:
                unit = originals[str(first)]  # [L, 2, T, H, D]
                per_block = unit.view(*unit.shape[:2], e.num_blocks, -1, *unit.shape[3:])
                for b in range(e.num_blocks):
                    block = per_block[:, :, b].contiguous()
                    out.append(Element(ray.put(block), Level.L0, 1, entry.layout.bytes_per_block()))
                self.counts["promoted_blocks"] += e.num_blocks
                self.metrics.promotions.inc(e.num_blocks)
            else:
                out.append(e)
            first += e.num_blocks
        entry.elements = out
        entry.originals.clear()
        entry.demoted_as = None
        self.spill.drop(f"{key}/originals")
        await self._enforce_budget(keep=key)
        self._update_gauges()
        return True

    # --- levels ------------------------------------------------------------------------
    async def _enforce_budget(self, keep: str | None = None) -> None:
        """Demote, then spill, least recently used first, until memory fits the budget.
        Callers hold `_lock`."""
        if self.num_bytes <= self.budget_bytes:
            return
        profile = await self._profile()
        for key, entry in list(self.entries.items()):
            if self.num_bytes <= self.budget_bytes:
                return
            if not entry.spilled and entry.demoted_as != profile.name:
                await self._demote(key, entry, profile)
        for key, entry in list(self.entries.items()):
            if self.num_bytes <= self.budget_bytes:
                return
            if not entry.spilled and key != keep:
                await self._spill(key, entry)

    async def _demote(self, key: str, entry: StoredKV, profile: Profile) -> None:
        entry.demoted_as = profile.name
        lossy = [lv for lv in (Level.L2, Level.L1) if lv in profile.allowed_levels]
        if not lossy:
            return
        target = lossy[0]
        bs = entry.layout.block_size
        ub = max(1, self.unit_tokens // bs)
        # Sessions at rest have no attention mass: under budget pressure every unit outside
        # the profile's sinks and recent window goes to the deepest lossy level it allows.
        forced = dataclasses.replace(
            profile, l1_importance=float("inf"), l2_importance=float("inf"),
            l1_pressure=0.0, l2_pressure=0.0, spill_pressure=float("inf"),
        )  # fmt: skip
        full_units = entry.num_tokens // (ub * bs)
        stats = [BlockStats(index=u, attention_mass=0.0) for u in range(full_units)]
        levels = assign_levels(stats, forced, 1.0, ub * bs, entry.num_tokens)
        demote_units = {u for u, lv in enumerate(levels) if lv != Level.L0}
        if not demote_units:
            return
        out: list[Element] = []
        originals: dict[str, torch.Tensor] = {}
        first = 0
        i = 0
        elements = entry.elements
        while i < len(elements):
            e = elements[i]
            u, aligned = divmod(first, ub)
            run = elements[i : i + ub]
            if (
                aligned == 0
                and u in demote_units
                and len(run) == ub
                and all(x.level == Level.L0 and x.num_blocks == 1 for x in run)
            ):
                blocks = [await x.ref for x in run]
                unit = torch.cat(blocks, dim=2)  # [L, 2, ub * bs, H, D]
                originals[str(first)] = unit
                key_bits, value_bits = profile.level_bits(target)
                qb = quantize_block(unit, key_bits, value_bits=value_bits)
                out.append(Element(ray.put(qb), target, ub, qb.num_bytes, _meta(qb)))
                self.counts["demoted_blocks"] += ub
                self.metrics.demotions.inc(ub)
                first += ub
                i += ub
                continue
            out.append(e)
            first += e.num_blocks
            i += 1
        if originals:
            # keep the bit-exact originals on disk (counted as disk): promotion is lossless
            known = (
                self.spill.get_tensors(f"{key}/originals") if entry.originals else {}
            )
            entry.disk_bytes += self.spill.put_tensors(f"{key}/originals", known | originals)
            entry.originals.update({int(k): 0 for k in originals})
            self.counts["spilled_blocks"] += ub * len(originals)
            self.metrics.spills.inc(ub * len(originals))
        entry.elements = out
        logger.info("kv_store: demoted %d units of %s to %s", len(originals), key, target.name)

    async def _spill(self, key: str, entry: StoredKV) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for i, e in enumerate(entry.elements):
            value = await e.ref
            if isinstance(value, QuantizedBlock):
                e.meta = _meta(value)
                for f in dataclasses.fields(value):
                    t = getattr(value, f.name)
                    if isinstance(t, torch.Tensor):
                        tensors[f"{i}.{f.name}"] = t
            else:
                tensors[f"{i}.block"] = value
        entry.disk_bytes += self.spill.put_tensors(f"{key}/data", tensors)
        for e in entry.elements:
            e.ref = None
        entry.spilled = True
        self.counts["spilled_blocks"] += entry.num_blocks
        self.metrics.spills.inc(entry.num_blocks)
        logger.info("kv_store: spilled %s (%d blocks) to disk", key, entry.num_blocks)

    async def _ensure_loaded(self, key: str, entry: StoredKV) -> None:
        if not entry.spilled:
            return
        tensors = self.spill.get_tensors(f"{key}/data")
        for i, e in enumerate(entry.elements):
            if e.meta is None:
                e.ref = ray.put(tensors[f"{i}.block"])
            else:
                fields = {
                    name.split(".", 1)[1]: t
                    for name, t in tensors.items()
                    if name.split(".", 1)[0] == str(i)
                }
                e.ref = ray.put(QuantizedBlock(**fields, **e.meta))
        entry.spilled = False
        entry.disk_bytes = max(0, entry.disk_bytes - self.spill.drop_size(f"{key}/data"))
        self.num_reloads += 1
        self.entries.move_to_end(key)
        await self._enforce_budget(keep=key)

    def _index(self, key: str, token_ids: list[int], block_size: int) -> None:
        for n, h in enumerate(block_hashes(token_ids, block_size), start=1):
            self.prefix_index[h] = (key, n)

    # --- observability ---------------------------------------------------------------------
    def _per_level(self) -> tuple[dict[str, int], dict[str, int]]:
        blocks = {lv.name: 0 for lv in Level}
        nbytes = {lv.name: 0 for lv in Level}
        for entry in self.entries.values():
            for e in entry.elements:
                level = Level.L3 if entry.spilled else e.level
                blocks[level.name] += e.num_blocks
                nbytes[level.name] += 0 if entry.spilled else e.num_bytes
            if entry.spilled:
                nbytes["L3"] += entry.disk_bytes
        return blocks, nbytes

    def _update_gauges(self) -> None:
        self.metrics.sequences.set(len(self.entries))
        self.metrics.blocks.set(sum(e.num_blocks for e in self.entries.values()))
        self.metrics.bytes.set(self.num_bytes)
        blocks, nbytes = self._per_level()
        for level, n in blocks.items():
            self.metrics.blocks_per_level[level].set(n)
        for level, n in nbytes.items():
            self.metrics.bytes_per_level[level].set(n)

    async def lookup(self, key: str) -> dict | None:
        """Metadata of one entry (for tests and the control API), without the refs."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        return {
            "key": key,
            "producer": entry.producer,
            "consumers": list(entry.consumers),
            "num_tokens": entry.num_tokens,
            "num_blocks": entry.num_blocks,
            "num_bytes": entry.memory_bytes,
            "disk_bytes": entry.disk_bytes,
            "spilled": entry.spilled,
            "levels": [e.level.name for e in entry.elements],
        }

    async def stats(self) -> dict:
        blocks, nbytes = self._per_level()
        return {
            "num_sequences": len(self.entries),
            "num_blocks": sum(e.num_blocks for e in self.entries.values()),
            "num_bytes": self.num_bytes,
            "disk_bytes": self.disk_bytes,
            "budget_bytes": self.budget_bytes,
            "num_puts": self.num_puts,
            "num_gets": self.num_gets,
            "num_evictions": self.num_evictions,
            "num_reloads": self.num_reloads,
            "blocks_per_level": blocks,
            "bytes_per_level": nbytes,
            **self.counts,
        }

    async def set_delta_ppl_estimate(self, estimate: float) -> None:
        self.metrics.delta_ppl_estimate.set(estimate)

    async def metrics_text(self) -> str:
        return self.metrics.exposition()


def _meta(qb: QuantizedBlock) -> dict[str, Any]:
    return {
        f.name: getattr(qb, f.name)
        for f in dataclasses.fields(qb)
        if not isinstance(getattr(qb, f.name), torch.Tensor)
    }
