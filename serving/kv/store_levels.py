"""The KV store's level moves as plain functions: which units of a sequence at rest to
demote, and how a sequence's elements become one file's tensors and back."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from policies.kv_levels import BlockStats, Level, Profile, assign_levels
from serving.kv.quant import QuantizedBlock
from serving.kv.store_entry import Element, quantized_meta, quantized_tensors


def units_to_demote(
    num_tokens: int, block_size: int, unit_blocks: int, profile: Profile
) -> set[int]:
    """Units (of `unit_blocks` blocks) of a sequence at rest to move to a lossy level.

    Sessions at rest have no attention mass: under budget pressure every unit outside the
    profile's sinks and recent window goes to the deepest lossy level it allows."""
    forced = dataclasses.replace(
        profile, l1_importance=float("inf"), l2_importance=float("inf"),
        l1_pressure=0.0, l2_pressure=0.0, spill_pressure=float("inf"),
    )  # fmt: skip
    unit_tokens = unit_blocks * block_size
    stats = [BlockStats(index=u, attention_mass=0.0) for u in range(num_tokens // unit_tokens)]
    levels = assign_levels(stats, forced, 1.0, unit_tokens, num_tokens)
    return {u for u, lv in enumerate(levels) if lv != Level.L0}


def deepest_lossy(profile: Profile) -> Level | None:
    lossy = [lv for lv in (Level.L2, Level.L1) if lv in profile.allowed_levels]
    return lossy[0] if lossy else None


def to_tensors(elements: list[Element], values: list[Any]) -> dict[str, torch.Tensor]:
    """One file's tensors for a sequence's element values (blocks or quantized units);
    records each quantized unit's metadata on its element, for `from_tensors`."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (e, value) in enumerate(zip(elements, values, strict=True)):
        if isinstance(value, QuantizedBlock):
            e.meta = quantized_meta(value)
            tensors |= {f"{i}.{name}": t for name, t in quantized_tensors(value).items()}
        else:
            tensors[f"{i}.block"] = value
    return tensors


def from_tensors(elements: list[Element], tensors: dict[str, torch.Tensor]) -> list[Any]:
    """The element values `to_tensors` wrote, in order."""
    fields: list[dict[str, torch.Tensor]] = [{} for _ in elements]
    for name, t in tensors.items():
        i, _, field = name.partition(".")
        fields[int(i)][field] = t
    values: list[Any] = []
    for e, f in zip(elements, fields, strict=True):
        values.append(f["block"] if e.meta is None else QuantizedBlock(**f, **e.meta))
    return values
