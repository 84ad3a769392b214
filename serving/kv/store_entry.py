"""What the KV store keeps per sequence: object refs of its blocks and their metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from policies.kv_levels import Level
from serving.kv.block_format import KVLayout, KVPayload
from serving.kv.quant import QuantizedBlock


@dataclass(slots=True)
class Element:
    """One block at L0, or one quantized unit of several blocks at L1/L2."""

    ref: Any  # an object-store ref; None while the sequence is spilled
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
    last_used: float
    hashes: list[int] = field(default_factory=list)  # chain hashes of its full blocks
    consumers: list[str] = field(default_factory=list)
    num_hits: int = 0  # times a later prompt re-used it as a prefix
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

    @property
    def eviction_rank(self) -> tuple[bool, float]:
        """Lower goes first: never re-used before re-used, then least recently used."""
        return (self.num_hits > 0, self.last_used)

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


def quantized_meta(qb: QuantizedBlock) -> dict[str, Any]:
    """A quantized block's non-tensor fields (what its spilled tensors need back)."""
    return {
        f.name: getattr(qb, f.name)
        for f in dataclasses.fields(qb)
        if not isinstance(getattr(qb, f.name), torch.Tensor)
    }


def quantized_tensors(qb: QuantizedBlock) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(qb, f.name)
        for f in dataclasses.fields(qb)
        if isinstance(getattr(qb, f.name), torch.Tensor)
    }
