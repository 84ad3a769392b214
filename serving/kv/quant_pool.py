"""Growable pools of quantized KV units, one pool per level (INT8, INT4).

A *unit* is a run of consecutive KV blocks quantized together (`QuantizedBlock` over
`[L, 2, T, H, D]`, T = tokens of the unit). The pool keeps every tensor field of all its
units in one array per field (`[capacity, *field_shape]`), so decode attention can take one
layer of many units with a single `index_select` per field and dequantize them in one
vectorized call, instead of touching units one by one.
"""

from __future__ import annotations

import dataclasses

import torch

from serving.kv.quant import QuantizedBlock, dequantize_parts

_MIN_CAPACITY = 16


def _tensor_fields(qb: QuantizedBlock) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(qb, f.name)
        for f in dataclasses.fields(qb)
        if isinstance(getattr(qb, f.name), torch.Tensor)
    }


class QuantPool:
    """Slots of same-shaped quantized units. Not thread-safe: the engine thread owns it."""

    def __init__(self) -> None:
        self._arrays: dict[str, torch.Tensor] = {}
        self._template: QuantizedBlock | None = None
        self._free: list[int] = []
        self._used: set[int] = set()
        self.unit_bytes = 0

    @property
    def capacity(self) -> int:
        return next(iter(self._arrays.values())).shape[0] if self._arrays else 0

    @property
    def num_units(self) -> int:
        return len(self._used)

    @property
    def num_bytes(self) -> int:
        """Bytes of the units held (not of spare capacity: that is reused, then grown)."""
        return self.num_units * self.unit_bytes

    def _grow(self, template: QuantizedBlock) -> None:
        old = self.capacity
        new = max(_MIN_CAPACITY, old * 2)
        for name, t in _tensor_fields(template).items():
            grown = torch.empty((new, *t.shape), dtype=t.dtype)
            if old:
                grown[:old].copy_(self._arrays[name])
            self._arrays[name] = grown
        self._free.extend(range(new - 1, old - 1, -1))  # pop() hands out low slots first

    def put(self, qb: QuantizedBlock) -> int:
        if self._template is None:
            self._template = qb
            self.unit_bytes = qb.num_bytes
        elif qb.shape != self._template.shape or qb.bits != self._template.bits:
            raise ValueError(
                f"unit {qb.shape}/{qb.bits} bits does not fit a pool of "
                f"{self._template.shape}/{self._template.bits} bits"
            )
        if not self._free:
            self._grow(qb)
        slot = self._free.pop()
        for name, t in _tensor_fields(qb).items():
            self._arrays[name][slot].copy_(t)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        self._used.remove(slot)
        self._free.append(slot)

    def get(self, slot: int) -> QuantizedBlock:
        assert self._template is not None
        return dataclasses.replace(
            self._template, **{n: a[slot].clone() for n, a in self._arrays.items()}
        )

    @property
    def bits(self) -> int:
        assert self._template is not None
        return self._template.bits

    @property
    def v_bits(self) -> int:
        assert self._template is not None
        return self._template.v_bits

    def layer_fields(self, slots: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor field of the units in `slots`, at one layer: `[n, ...]` each."""
        return {n: a[:, layer].index_select(0, slots) for n, a in self._arrays.items()}

    def dequantize_layer(
        self, slots: torch.Tensor, layer: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[n, T, H, D]`: one layer of the units in `slots`, dequantized.

        Works because every field keeps the layer as its first dim: selecting `[slots,
        layer]` yields a `QuantizedBlock` whose "layers" are the n units."""
        assert self._template is not None
        fields = self.layer_fields(slots, layer)
        qb = dataclasses.replace(
            self._template, **fields, shape=(len(slots), *self._template.shape[1:])
        )
        return dequantize_parts(qb, dtype)
