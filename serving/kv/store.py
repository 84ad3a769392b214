"""The KV store: an index of sequences' KV, held as object-store refs, in levels.

Producers put their blocks into an object store and register the refs here; consumers
look them up and read the objects themselves. The store keeps refs and metadata, never a
second copy of what it was given. `deployments/kv_store.py` runs one as a Ray actor with
Ray's object store; tests run it with a dict (`ObjectStore` is all it needs).

What it keeps, and for how long (an entry lives while it is useful):
- a sequence stays while it was used within `store_ttl_s` (its conversation's next turn
  is coming) or a later prompt re-used it as a prefix (a shared system prompt);
- a sequence whose every full block a newer one also holds (the previous turn of a
  conversation, once the next turn is stored) is released at once;
- beyond `store_budget_bytes` of memory, the least recently used sequences are first
  *demoted* (their unpinned units quantized to the deepest lossy level the current profile
  allows, originals written to disk so promotion is bit-exact), then *spilled* whole to
  disk (L3) and reloaded on their next access;
- beyond `spill_budget_bytes` of disk, or on a full disk, sequences are *evicted*: never
  re-used ones first, then least recently used. An evicted sequence is a later cache miss,
  never an error.
Full blocks are indexed by a hash chain of their tokens (`PrefixIndex`), pruned with
the entries, so a prompt that starts with a stored prefix reuses its KV.

The current profile is pushed by the scheduler (`set_profile`): nothing here calls up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from policies.kv_levels import PROFILES, Level, Profile
from serving.config import KVCacheSettings
from serving.kv.block_format import KVPayload
from serving.kv.prefix import block_hashes
from serving.kv.prefix_index import PrefixIndex
from serving.kv.quant import quantize_block
from serving.kv.spill import SpillStore, Writer
from serving.kv.spill_dir import SpillDirectory
from serving.kv.store_entry import Element, StoredKV, quantized_meta
from serving.kv.store_levels import (
    deepest_lossy,
    from_tensors,
    to_tensors,
    units_to_demote,
)
from serving.metrics import StoreMetrics

logger = logging.getLogger(__name__)

# errors a full disk or quota raises; evicting others may make room for a retry
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
MAX_CONSUMERS = 16  # readers remembered per entry (for `lookup`)


class ObjectStore(Protocol):
    """Where the blocks themselves live: Ray's object store in the app."""

    def put(self, value: Any) -> Any: ...

    async def get(self, ref: Any) -> Any: ...


class KVStore:
    def __init__(
        self,
        settings: KVCacheSettings,
        objects: ObjectStore,
        metrics: StoreMetrics,
        *,
        writer: Writer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = settings.store_budget_bytes
        self.spill_budget_bytes = settings.spill_budget_bytes
        self.ttl_s = settings.store_ttl_s
        self.unit_tokens = settings.quant_unit_tokens
        self.profile: Profile = PROFILES[settings.profile]
        self.objects, self.metrics, self.clock = objects, metrics, clock
        self.spill_dir = SpillDirectory(Path(settings.spill_dir) if settings.spill_dir else None)
        spill_args = (writer,) if writer is not None else ()
        self.spill = SpillStore(self.spill_dir.path, *spill_args)
        self.entries: OrderedDict[str, StoredKV] = OrderedDict()  # least recently used first
        self.index = PrefixIndex()
        self.num_puts = self.num_gets = self.num_reloads = 0
        self.num_evictions = 0  # dropped for a budget or a full disk
        self.num_released = 0  # dropped because nothing needs them any more
        self.num_spill_failures = 0
        self.counts = {"demoted_blocks": 0, "promoted_blocks": 0, "spilled_blocks": 0}
        # Demotion, spilling and reloading await object reads; one call at a time, or two
        # interleaving at those awaits would spill a half-spilled sequence.
        self._lock = asyncio.Lock()
        self._in_use: str | None = None  # the key the call holding `_lock` serves
        self._closed = False
        self._update_gauges()

    # --- sizes -------------------------------------------------------------------------
    @property
    def num_bytes(self) -> int:
        """KV bytes held in memory (spilled sequences and originals are disk)."""
        return sum(e.memory_bytes for e in self.entries.values())

    @property
    def disk_bytes(self) -> int:
        return sum(e.disk_bytes for e in self.entries.values())

    # --- policy, pushed down by the scheduler --------------------------------------------
    def set_profile(self, name: str) -> None:
        """The staged-KV profile demotion follows from now on (raises on an unknown one)."""
        if name not in PROFILES:
            raise ValueError(f"unknown KV profile {name!r}; one of {sorted(PROFILES)}")
        if name != self.profile.name:
            logger.info("kv_store: KV profile %s -> %s", self.profile.name, name)
        self.profile = PROFILES[name]

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
                qb = await self.objects.get(e.ref)
                e.level = Level.L1 if qb.bits == 8 else Level.L2
        async with self._serving(key):
            if self._closed:
                return
            now = self.clock()
            self._drop(key)  # a key put again replaces its entry (files and index too)
            entry = StoredKV(payload.layout, payload.num_tokens, elements, producer, now)
            self.entries[key] = entry
            if token_ids is not None:
                entry.hashes = block_hashes(token_ids, payload.layout.block_size)
                self.index.add(key, entry.hashes)
                self._release_contained(key, entry)
            self.num_puts += 1
            self._expire(now)
            await self._enforce_budget(keep=key)
            self._update_gauges()

    async def get(self, key: str, consumer: str) -> KVPayload | None:
        async with self._serving(key):
            entry = self.entries.get(key)
            if entry is None or not await self._ensure_loaded(key, entry):
                return None
            self._touch(key, entry, consumer)
            self.num_gets += 1
            self._update_gauges()
            return entry.payload()

    async def match_prefix(
        self, token_ids: list[int], block_size: int, consumer: str, longer_than: int = 0
    ) -> KVPayload | None:
        """KV of the longest stored prefix of `token_ids` (whole blocks, whole quantized
        units, and at least one token left to compute), or None; None too where it covers
        no more than `longer_than` tokens (what the consumer's engine holds already: not a
        hit of the store's)."""
        self.metrics.prefix_queries.inc(len(token_ids))
        async with self._serving(None):
            best = self.index.longest(block_hashes(token_ids[:-1], block_size))
            if best is None:
                return None
            key, num_blocks = best
            if num_blocks * block_size <= longer_than:  # not worth loading a spilled entry
                return None
            self._in_use = key
            entry = self.entries[key]  # the index holds only live entries
            if not await self._ensure_loaded(key, entry):
                return None
            payload = entry.payload(num_blocks)
            if payload.num_tokens <= longer_than:
                return None
            self._touch(key, entry, consumer)
            entry.num_hits += 1
            self.metrics.prefix_hits.inc(payload.num_tokens)
            self._update_gauges()
            return payload

    async def drop(self, key: str) -> bool:
        async with self._lock:
            found = self._drop(key)
            self._update_gauges()
            return found

    async def drop_producer(self, producer: str) -> int:
        """Forget every entry `producer` put, as it has died: Ray's objects die with the
        process that put them, so its entries could only fail their readers. Returns how
        many were dropped."""
        async with self._lock:
            keys = [k for k, e in self.entries.items() if e.producer == producer]
            for key in keys:
                self._drop(key)
            if keys:
                logger.info("kv_store: dropped %d entries of lost %s", len(keys), producer)
            self._update_gauges()
            return len(keys)

    async def promote(self, key: str) -> bool:
        """Every demoted unit of `key` back to L0 from its spilled original: bit-exact."""
        async with self._serving(key):
            return await self._promote(key)

    async def close(self) -> None:
        """Drop everything and remove the spill directory (at shutdown; idempotent)."""
        async with self._lock:
            self._closed = True
            for key in list(self.entries):
                self._drop(key)
            self.spill_dir.close()
            self._update_gauges()
            logger.info("kv_store: closed, %s removed", self.spill_dir.path)

    @contextlib.asynccontextmanager
    async def _serving(self, key: str | None) -> AsyncIterator[None]:
        """Hold the lock for a call about `key` (never evicted to make room for another)."""
        async with self._lock:
            self._in_use = key
            try:
                yield
            finally:
                self._in_use = None

    # --- what stays --------------------------------------------------------------------
    def _touch(self, key: str, entry: StoredKV, consumer: str | None = None) -> None:
        entry.last_used = self.clock()
        self.entries.move_to_end(key)
        if consumer is not None:
            entry.consumers.append(consumer)
            del entry.consumers[:-MAX_CONSUMERS]  # a shared prefix is read without end

    def _drop(self, key: str) -> bool:
        """Forget `key`: its refs, its index hashes and its files."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        self.index.remove(key, entry.hashes)
        self.spill.drop(f"{key}/data")
        self.spill.drop(f"{key}/originals")
        return True

    def _evict(self, key: str, why: str) -> None:
        if self._drop(key):
            self.num_evictions += 1
            self.metrics.evictions.inc()
            logger.info("kv_store: evicted %s (%s)", key, why)

    def _release(self, key: str, why: str) -> None:
        if self._drop(key):
            self.num_released += 1
            self.metrics.released.inc()
            logger.debug("kv_store: released %s (%s)", key, why)

    def _release_contained(self, key: str, entry: StoredKV) -> None:
        """Release older sequences whose every full block `entry` holds too (the previous
        turn of this conversation): nothing can need them any more. One not read yet (a
        prefill's handoff a decode replica is about to `get`) stays until its TTL."""
        for other in self.index.contained_in(entry.hashes):
            held = self.entries.get(other)
            if other != key and held is not None and held.consumers:
                self._release(other, f"contained in {key}")

    def _expire(self, now: float) -> None:
        """Release sequences idle beyond the TTL that no later prompt ever re-used."""
        if self.ttl_s is None:
            return
        for key, entry in list(self.entries.items()):  # least recently used first
            if now - entry.last_used < self.ttl_s:
                return
            if entry.num_hits == 0:
                self._release(key, "idle")

    # --- levels ------------------------------------------------------------------------
    async def _enforce_budget(self, keep: str | None = None) -> None:
        """Demote, then spill, least recently used first, until memory fits the budget.
        Callers hold `_lock`."""
        if self.num_bytes <= self.budget_bytes:
            return
        for key, entry in list(self.entries.items()):
            if self.num_bytes <= self.budget_bytes:
                return
            if self.entries.get(key) is entry and not entry.spilled:
                if entry.demoted_as != self.profile.name:
                    await self._demote(key, entry, self.profile)
        for key, entry in list(self.entries.items()):
            if self.num_bytes <= self.budget_bytes:
                return
            if self.entries.get(key) is entry and not entry.spilled and key != keep:
                await self._spill(key, entry)

    async def _demote(self, key: str, entry: StoredKV, profile: Profile) -> None:
        entry.demoted_as = profile.name
        target = deepest_lossy(profile)
        if target is None:
            return
        ub = max(1, self.unit_tokens // entry.layout.block_size)
        demote_units = units_to_demote(entry.num_tokens, entry.layout.block_size, ub, profile)
        if not demote_units:
            return
        out: list[Element] = []
        originals: dict[str, torch.Tensor] = {}
        first = i = 0
        elements = entry.elements
        while i < len(elements):
            u, aligned = divmod(first, ub)
            run = elements[i : i + ub]
            if (
                aligned == 0
                and u in demote_units
                and len(run) == ub
                and all(x.level == Level.L0 and x.num_blocks == 1 for x in run)
            ):
                blocks = [await self.objects.get(x.ref) for x in run]
                unit = torch.cat(blocks, dim=2)  # [L, 2, ub * bs, H, D]
                originals[str(first)] = unit
                key_bits, value_bits = profile.level_bits(target)
                qb = quantize_block(unit, key_bits, value_bits=value_bits)
                ref = self.objects.put(qb)
                out.append(Element(ref, target, ub, qb.num_bytes, quantized_meta(qb)))
                first += ub
                i += ub
                continue
            out.append(elements[i])
            first += elements[i].num_blocks
            i += 1
        if not originals:
            return
        # Keep the bit-exact originals on disk (counted as disk): promotion is lossless.
        # No room for them: the entry stays at full precision (spilling or eviction next).
        try:
            known = self.spill.get_tensors(f"{key}/originals") if entry.originals else {}
        except (OSError, KeyError, ValueError) as e:  # unreadable: keep this entry as it is
            logger.warning("kv_store: originals of %s unreadable (%s): not demoted", key, e)
            return
        written = self._write(key, entry, "originals", known | originals)
        if written is None:
            return
        entry.elements = out
        entry.originals.update({int(k): 0 for k in originals})
        n = ub * len(originals)
        self.counts["demoted_blocks"] += n
        self.metrics.demotions.inc(n)
        self.counts["spilled_blocks"] += n
        self.metrics.spills.inc(n)
        logger.info("kv_store: demoted %d units of %s to %s", len(originals), key, target.name)

    async def _spill(self, key: str, entry: StoredKV) -> None:
        values = [await self.objects.get(e.ref) for e in entry.elements]
        if self._write(key, entry, "data", to_tensors(entry.elements, values)) is None:
            self._evict(key, "no disk room to spill it")
            return
        for e in entry.elements:
            e.ref = None
        entry.spilled = True
        self.counts["spilled_blocks"] += entry.num_blocks
        self.metrics.spills.inc(entry.num_blocks)
        logger.info("kv_store: spilled %s (%d blocks) to disk", key, entry.num_blocks)

    async def _ensure_loaded(self, key: str, entry: StoredKV) -> bool:
        """Reload a spilled entry into the object store; False (the entry evicted) if its
        file can't be read back: a cache miss, not an error."""
        if not entry.spilled:
            return True
        try:
            tensors = self.spill.get_tensors(f"{key}/data")
            values = from_tensors(entry.elements, tensors)
        except (OSError, KeyError, ValueError) as e:
            logger.warning("kv_store: reloading %s failed (%s): evicted", key, e)
            self._evict(key, "unreadable spill file")
            return False
        for e, value in zip(entry.elements, values, strict=True):
            e.ref = self.objects.put(value)
        entry.spilled = False
        entry.disk_bytes = max(0, entry.disk_bytes - self.spill.drop_size(f"{key}/data"))
        self.num_reloads += 1
        self._touch(key, entry)
        await self._enforce_budget(keep=key)
        return True

    async def _promote(self, key: str) -> bool:
        entry = self.entries.get(key)
        if entry is None or not entry.originals:
            return False
        if not await self._ensure_loaded(key, entry):
            return False
        try:
            originals = self.spill.get_tensors(f"{key}/originals")
        except (OSError, KeyError, ValueError) as e:
            logger.warning("kv_store: originals of %s unreadable (%s): not promoted", key, e)
            return False
        out: list[Element] = []
        first = 0
        block_bytes = entry.layout.bytes_per_block()
        for e in entry.elements:
            if e.level in (Level.L1, Level.L2) and str(first) in originals:
                unit = originals[str(first)]  # [L, 2, T, H, D]
                per_block = unit.view(*unit.shape[:2], e.num_blocks, -1, *unit.shape[3:])
                for b in range(e.num_blocks):
                    ref = self.objects.put(per_block[:, :, b].contiguous())
                    out.append(Element(ref, Level.L0, 1, block_bytes))
                self.counts["promoted_blocks"] += e.num_blocks
                self.metrics.promotions.inc(e.num_blocks)
            else:
                out.append(e)
            first += e.num_blocks
        entry.elements = out
        entry.originals.clear()
        entry.demoted_as = None
        entry.disk_bytes = max(0, entry.disk_bytes - self.spill.drop_size(f"{key}/originals"))
        await self._enforce_budget(keep=key)
        self._update_gauges()
        return True

    # --- disk --------------------------------------------------------------------------
    def _write(
        self, key: str, entry: StoredKV, part: str, tensors: dict[str, torch.Tensor]
    ) -> int | None:
        """Write (or rewrite) one file of `entry` within the disk budget, evicting less
        useful spilled sequences for room; its bytes, or None (with a warning) if it can't
        be written. A failed write leaves the previous file as it was."""
        name = f"{key}/{part}"
        previous = self.spill.size(name)
        need = sum(t.numel() * t.element_size() for t in tensors.values()) - previous
        if not self._make_room(need, entry):
            return self._write_failed(key, "over kv_cache.spill_budget_bytes")
        try:
            written = self.spill.put_tensors(name, tensors)
        except OSError as e:
            if e.errno not in _NO_SPACE:
                return self._write_failed(key, f"spilling failed: {e}")
            # a full disk (shared with others): free what we hold, then retry once
            self._make_room(need, entry, free_at_least=max(need, 1))
            try:
                written = self.spill.put_tensors(name, tensors)
            except OSError as e2:
                return self._write_failed(key, f"disk full: {e2}")
        entry.disk_bytes += written - previous
        # file headers cost a little more than `need`: the budget is a hard limit all the same
        if self.disk_bytes > self.spill_budget_bytes and not self._make_room(0, entry):
            entry.disk_bytes -= self.spill.drop_size(name)
            return self._write_failed(key, "over kv_cache.spill_budget_bytes")
        return written

    def _make_room(self, need: int, entry: StoredKV, free_at_least: int = 0) -> bool:
        """Evict spilled sequences less useful than `entry` (never re-used first, then least
        recently used) until `need` more bytes fit the disk budget and `free_at_least`
        bytes were freed; False if only more useful ones (or none) are left. The sequence
        the current call serves (`_in_use`) is never evicted for another."""
        freed = 0
        while self.disk_bytes + need > self.spill_budget_bytes or freed < free_at_least:
            on_disk = [
                (k, e)
                for k, e in self.entries.items()
                if e.disk_bytes > 0 and e is not entry and k != self._in_use
            ]
            if not on_disk:
                return False
            victim_key, victim = min(on_disk, key=lambda kv: kv[1].eviction_rank)
            if victim.eviction_rank > entry.eviction_rank:
                return False
            freed += victim.disk_bytes
            self._evict(victim_key, "disk budget")
        return True

    def _write_failed(self, key: str, why: str) -> None:
        self.num_spill_failures += 1
        self.metrics.spill_failures.inc()
        logger.warning("kv_store: could not write %s to disk: %s", key, why)
        return None

    # --- observability -----------------------------------------------------------------
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
        self.metrics.disk_bytes.set(self.disk_bytes)
        blocks, nbytes = self._per_level()
        for level, n in blocks.items():
            self.metrics.blocks_per_level[level].set(n)
        for level, n in nbytes.items():
            self.metrics.bytes_per_level[level].set(n)

    def lookup(self, key: str) -> dict | None:
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
            "num_hits": entry.num_hits,
            "levels": [e.level.name for e in entry.elements],
        }

    def stats(self) -> dict:
        blocks, nbytes = self._per_level()
        return {
            "num_sequences": len(self.entries),
            "num_blocks": sum(e.num_blocks for e in self.entries.values()),
            "num_bytes": self.num_bytes,
            "disk_bytes": self.disk_bytes,
            "budget_bytes": self.budget_bytes,
            "spill_budget_bytes": self.spill_budget_bytes,
            "spill_dir": str(self.spill_dir.path),
            "profile": self.profile.name,
            "num_indexed_hashes": len(self.index),
            "num_puts": self.num_puts,
            "num_gets": self.num_gets,
            "num_evictions": self.num_evictions,
            "num_released": self.num_released,
            "num_spill_failures": self.num_spill_failures,
            "num_reloads": self.num_reloads,
            "blocks_per_level": blocks,
            "bytes_per_level": nbytes,
            **self.counts,
        }
