"""Reusable flat buffers for a backend's per-step inputs and outputs.

A step asks for `numel` elements under a name and gets a contiguous view of the first
`numel` elements of that name's buffer; a buffer only grows (to the next power of two)
when a step needs more than its capacity, so in steady state no step allocates. `num_allocations`
counts the growths, which is what the unit test watches.
"""

from __future__ import annotations

import torch


class BufferPool:
    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.num_allocations = 0

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            # next power of two: a growing context or batch re-allocates O(log n) times
            capacity = 1 << max(numel - 1, 0).bit_length()
            buf = torch.empty(capacity, dtype=dtype)
            self._buffers[name] = buf
            self.num_allocations += 1
        return buf[:numel].view(shape)

    def data_ptrs(self) -> dict[str, int]:
        return {name: buf.data_ptr() for name, buf in self._buffers.items()}

    @property
    def num_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
