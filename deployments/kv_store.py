"""The `kv_store` actor: an index of every sequence's KV blocks, held as Ray object refs.

Producers `ray.put` their blocks and register the refs here; consumers look them up and
read the objects zero-copy from the node's object store. The store keeps refs and
metadata, never a second copy, and drops the least recently used sequences beyond its
byte budget. (Levels and spilling arrive with the staged-KV issue.)
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from serving.config import InferosConfig
from serving.kv.block_format import KVPayload
from serving.metrics import StoreMetrics

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredKV:
    payload: KVPayload  # blocks are ObjectRefs
    producer: str
    created_at: float = field(default_factory=time.time)
    consumers: list[str] = field(default_factory=list)


class KVStoreActor:
    def __init__(self, config: dict):
        cfg = InferosConfig.model_validate(config)
        self.budget_bytes = cfg.kv_cache.store_budget_bytes
        self.entries: OrderedDict[str, StoredKV] = OrderedDict()
        self.num_puts = 0
        self.num_gets = 0
        self.num_evictions = 0
        self.metrics = StoreMetrics(cfg.model.served_model_name or "default")

    @property
    def num_bytes(self) -> int:
        return sum(e.payload.num_bytes for e in self.entries.values())

    async def put(self, key: str, payload: KVPayload, producer: str) -> None:
        self.entries[key] = StoredKV(payload, producer)
        self.entries.move_to_end(key)
        self.num_puts += 1
        self._evict_over_budget()
        self._update_gauges()

    async def get(self, key: str, consumer: str) -> KVPayload | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        entry.consumers.append(consumer)
        self.num_gets += 1
        return entry.payload

    async def drop(self, key: str) -> bool:
        found = self.entries.pop(key, None) is not None
        self._update_gauges()
        return found

    def _evict_over_budget(self) -> None:
        total = self.num_bytes
        while total > self.budget_bytes and len(self.entries) > 1:
            key, entry = self.entries.popitem(last=False)
            total -= entry.payload.num_bytes
            self.num_evictions += 1
            self.metrics.evictions.inc()
            logger.info(
                "kv_store over budget: dropped %s (%d blocks)", key, entry.payload.num_blocks
            )

    def _update_gauges(self) -> None:
        self.metrics.sequences.set(len(self.entries))
        self.metrics.blocks.set(sum(e.payload.num_blocks for e in self.entries.values()))
        self.metrics.bytes.set(self.num_bytes)

    async def lookup(self, key: str) -> dict | None:
        """Metadata of one entry (for tests and the control API), without the refs."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        return {
            "key": key,
            "producer": entry.producer,
            "consumers": list(entry.consumers),
            "num_tokens": entry.payload.num_tokens,
            "num_blocks": entry.payload.num_blocks,
            "num_bytes": entry.payload.num_bytes,
        }

    async def stats(self) -> dict:
        return {
            "num_sequences": len(self.entries),
            "num_blocks": sum(e.payload.num_blocks for e in self.entries.values()),
            "num_bytes": self.num_bytes,
            "budget_bytes": self.budget_bytes,
            "num_puts": self.num_puts,
            "num_gets": self.num_gets,
            "num_evictions": self.num_evictions,
        }

    async def metrics_text(self) -> str:
        return self.metrics.exposition()
