"""Apply grammar masks to a batch of logits: one bitmask fill for all constrained rows, then
-inf wherever the grammar forbids a token. Rows without a matcher are not touched, and a
batch with no constrained row costs one scan of a Python list."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from serving.structured.backend import GrammarBackend, GrammarMatcher, allocate_bitmask

# [256, 8] float32: for each byte value, 0 where bit b is set (allowed), -inf where clear.
# Adding looked-up rows is the fastest CPU way we measured to mask [8, 49152] logits
# (~0.2 ms, 1 thread): masked_fill_ with a bool mask took 1.4 ms and xgrammar's C++
# apply kernel 0.9 ms on this machine (benchmarks/grammar_engines.py's apply row).
_BYTE_BIAS = torch.tensor(
    [[0.0 if (byte >> bit) & 1 else float("-inf") for bit in range(8)] for byte in range(256)]
)
# Byte k of an int32 word holds bits 8k..8k+7 only on little-endian hosts.
assert sys.byteorder == "little", "the byte-table mask assumes a little-endian host"


def bitmask_to_bias(bitmask: torch.Tensor) -> torch.Tensor:
    """int32 `[n, num_words]` → float32 `[n, 32 * num_words]`: 0 allowed, -inf forbidden."""
    num_rows = bitmask.shape[0]
    byte_ids = bitmask.contiguous().view(torch.uint8).flatten().int()  # [n * num_words * 4]
    return _BYTE_BIAS.index_select(0, byte_ids).view(num_rows, -1)


def apply_bitmask_inplace(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]
) -> None:
    """`logits[rows[i]]` ← -inf where `bitmask[i]` has the token's bit clear.

    logits: [num_rows, logits_vocab] float32; bitmask: [len(rows), num_words] int32. The
    model's logits vocab may differ from the bitmask's `32 * num_words` bits: columns past
    the bitmask are forbidden (tokens the grammar's tokenizer does not know), bits past the
    logits are ignored (the tokenizer's padding). Logits must be finite or -inf
    (+inf + -inf would give NaN)."""
    logits_vocab = logits.shape[1]
    num_bits = bitmask.shape[1] * 32
    width = min(logits_vocab, num_bits)
    bias = bitmask_to_bias(bitmask).to(logits.dtype)  # [len(rows), num_bits]
    if len(rows) == logits.shape[0] and list(rows) == list(range(len(rows))):
        logits[:, :width].add_(bias[:, :width])
        if logits_vocab > num_bits:
            logits[:, num_bits:] = float("-inf")
        return
    for i, row in enumerate(rows):
        logits[row, :width].add_(bias[i, :width])
        if logits_vocab > num_bits:
            logits[row, num_bits:] = float("-inf")


class LogitsMasker:
    """Owns one reusable bitmask buffer for a backend; the sampler calls `apply` per step."""

    def __init__(self, backend: GrammarBackend, max_num_rows: int = 8) -> None:
        self.backend = backend
        self._bitmask = allocate_bitmask(max_num_rows, backend.vocab_size)  # [rows, words]

    def apply(self, logits: torch.Tensor, matchers: Sequence[GrammarMatcher | None]) -> None:
        """In place on `logits [len(matchers), vocab]`: row i masked by `matchers[i]`'s
        grammar; rows whose matcher is None (unconstrained) or terminated stay bit-identical."""
        assert logits.shape[0] == len(matchers)
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return
        bitmask = self._buffer(len(rows))
        self.backend.fill_bitmasks([matchers[i] for i in rows], range(len(rows)), bitmask)
        apply_bitmask_inplace(logits, bitmask, rows)

    def _buffer(self, num_rows: int) -> torch.Tensor:
        if num_rows > self._bitmask.shape[0]:
            self._bitmask = allocate_bitmask(num_rows, self.backend.vocab_size)
        return self._bitmask[:num_rows]
