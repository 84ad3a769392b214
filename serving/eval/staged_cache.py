"""The KV cache of one evaluated sequence, staged the way a live decode would stage it.

A paged cache `[L, 2, num_blocks, block_size, H, D]` in the model's dtype with one block
table `0..num_blocks-1`. After every chunk of tokens the caller runs `restage`: each complete
quantization unit gets its level from `policies.kv_levels.live_unit_levels` (the engine's
rule), and a demoted unit's slots are overwritten with `fake_quantize(original)`, i.e.
exactly the values the engine's attention dequantizes; a unit promoted back gets its
original. Originals are kept aside so re-demotion starts from the exact values, as the
engine does (it keeps them in its spill tier).
"""

from __future__ import annotations

import torch

from policies.kv_levels import Level, Profile, live_unit_levels
from serving.kv.quant import dequantize_block, quantize_block


class StagedCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_tokens: int,
        dtype: torch.dtype,
        profile: Profile,
        block_size: int = 16,
    ):
        if profile.quant_group_tokens % block_size:
            raise ValueError("quant_group_tokens must be a multiple of the block size")
        self.profile = profile
        self.block_size = block_size
        self.blocks_per_unit = profile.quant_group_tokens // block_size
        num_blocks = -(-num_tokens // block_size)
        self.kv = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype
        )  # [L, 2, nb, bs, H, D]
        self.block_table = torch.arange(num_blocks, dtype=torch.long)
        self.token_bytes = 2 * num_layers * num_kv_heads * head_dim * self.kv.element_size()
        self.levels: dict[int, Level] = {}  # unit -> level, for units not at L0
        self.unit_bytes: dict[int, int] = {}  # unit -> bytes held at its level
        self._originals: dict[int, torch.Tensor] = {}
        self.unit_mass: list[float] = []  # attention mass received per unit (optional)
        self.bytes_per_token_samples: list[float] = []  # filled by the eval loop
        # (unit, key_bits, value_bits) -> QuantizedBlock; swappable to try other recipes
        self.quantizer = lambda unit, kb, vb: quantize_block(unit, kb, value_bits=vb)

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]

    def _unit_view(self, u: int) -> torch.Tensor:
        """`[L, 2, T, H, D]` copy of unit u as the cache holds it now."""
        b = self.blocks_per_unit
        data = self.kv[:, :, u * b : (u + 1) * b]  # [L, 2, b, bs, H, D]
        return data.reshape(data.shape[0], 2, b * self.block_size, *data.shape[4:]).clone()

    def _write_unit(self, u: int, data: torch.Tensor) -> None:
        b = self.blocks_per_unit
        shape = self.kv[:, :, u * b : (u + 1) * b].shape
        self.kv[:, :, u * b : (u + 1) * b] = data.reshape(shape).to(self.kv.dtype)

    def restage(self, num_tokens: int, pressure: float) -> int:
        """Apply the profile's levels for a sequence of `num_tokens`; returns units moved."""
        levels = live_unit_levels(self.unit_mass, self.profile, pressure, num_tokens)
        moves = 0
        for u, level in enumerate(levels):
            current = self.levels.get(u, Level.L0)
            if level == current:
                continue
            original = self._originals.get(u)
            if original is None:
                original = self._originals[u] = self._unit_view(u)
            if level == Level.L0:
                self._write_unit(u, original)
                del self.levels[u], self.unit_bytes[u]
            else:
                key_bits, value_bits = self.profile.level_bits(level)
                qb = self.quantizer(original, key_bits, value_bits)
                self._write_unit(u, dequantize_block(qb))
                self.levels[u] = level
                self.unit_bytes[u] = qb.num_bytes
            moves += 1
        return moves

    def num_bytes(self, num_tokens: int) -> int:
        """Bytes the engine would hold for this sequence: L0 tokens plus quantized units."""
        quantized_tokens = len(self.levels) * self.profile.quant_group_tokens
        return (num_tokens - quantized_tokens) * self.token_bytes + sum(self.unit_bytes.values())

    def level_tokens(self, num_tokens: int) -> dict[str, int]:
        out = {lv.name: 0 for lv in Level}
        for level in self.levels.values():
            out[level.name] += self.profile.quant_group_tokens
        out["L0"] = num_tokens - sum(out.values())
        return out
