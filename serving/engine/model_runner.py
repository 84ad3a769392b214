"""Owns the model and the KV cache tensor; turns a scheduled batch into next-token logits."""

from __future__ import annotations

import torch

from serving.backends.kv_import import same_geometry
from serving.engine.scheduler import SchedulerOutput
from serving.engine.staged_kv import HOLE, StagedPlan
from serving.kv.block_format import KVLayout, KVPayload
from serving.models.attention import AttentionMetadata
from serving.models.llama import LlamaForCausalLM


class ModelRunner:
    supports_mixed_batches = True  # decode rows and prompt chunks in one forward pass
    supports_prefix_cache = True  # reads every sequence's KV through its block table

    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int, kv_dtype: torch.dtype
    ):
        arch = model.arch
        self.model = model
        self.block_size = block_size
        self.last_importance: torch.Tensor | None = None
        # The last step's final hidden states `[num_tokens, hidden]` (prompt logprobs read
        # them; kept, not copied).
        self.last_hidden: torch.Tensor | None = None
        self.layout = KVLayout(
            num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            block_size=block_size,
            dtype=str(kv_dtype).removeprefix("torch."),
        )
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        self.kv_cache = torch.zeros(
            (arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim),
            dtype=kv_dtype,
        )

    @property
    def kv_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def _prepare(
        self, batch: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Model inputs for a batch, built with a handful of tensor ops whatever its size:
        per-token Python loops cost more than a decode step's attention at 32 sequences."""
        bs = self.block_size
        seqs, counts = batch.seqs, batch.num_scheduled_tokens
        starts = [seq.num_computed_tokens for seq in seqs]
        input_ids: list[int] = []
        for seq, start, n in zip(seqs, starts, counts, strict=True):
            input_ids.extend(seq.token_ids(start, start + n))
        max_blocks = max(len(s.block_table) for s in seqs)
        # holes (quantized units, -1) gather block 0, then get overwritten
        tables = torch.tensor(
            [
                [max(b, 0) for b in s.block_table] + [0] * (max_blocks - len(s.block_table))
                for s in seqs
            ],
            dtype=torch.long,
        )  # [num_seqs, max_blocks]
        context_lens = [start + n for start, n in zip(starts, counts, strict=True)]
        query_lens = torch.tensor(counts)
        row = torch.repeat_interleave(torch.arange(len(seqs)), query_lens)  # [num_tokens]
        first = torch.tensor(starts) - (query_lens.cumsum(0) - query_lens)
        positions = first[row] + torch.arange(len(input_ids))
        slots = tables[row, positions // bs] * bs + positions % bs
        meta = AttentionMetadata(
            slot_mapping=slots,
            block_tables=tables,
            context_lens=torch.tensor(context_lens, dtype=torch.long),
            query_lens=list(counts),
            context_lens_list=context_lens,
            all_decode=not batch.is_prefill,
        )
        return torch.tensor(input_ids, dtype=torch.long), positions, meta

    @torch.inference_mode()
    def execute(
        self,
        batch: SchedulerOutput,
        staged: StagedPlan | None = None,
        importance_layer: int = -1,
    ) -> torch.Tensor:
        """fp32 logits `[num_sampling_rows, vocab]` at the last scheduled token of each of
        `batch.sampling_rows` (a prompt chunk short of the prompt's end has none: the LM
        head is the largest matmul of a small model).

        With `importance_layer` >= 0 on a decode step, `last_importance` holds that layer's
        attention mass per logical block `[num_seqs, blocks]` afterwards."""
        input_ids, positions, meta = self._prepare(batch)
        meta.staged = staged
        meta.importance_layer = importance_layer if meta.all_decode else -1
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        self.last_importance = meta.importance
        self.last_hidden = hidden
        last = torch.tensor(meta.query_lens).cumsum(0) - 1
        if batch.sample_rows is not None and len(batch.sample_rows) < len(batch.seqs):
            last = last[batch.sample_rows]
        return self.model.compute_logits(hidden[last])

    # --- KV exchange -------------------------------------------------------------------
    def export_blocks(self, block_table: list[int], num_tokens: int) -> KVPayload:
        """Copy the blocks holding the first `num_tokens` tokens out of the pool."""
        n = -(-num_tokens // self.block_size)
        if any(b == HOLE for b in block_table[:n]):
            raise ValueError("export of a sequence with quantized units is not supported yet")
        blocks = [self.kv_cache[:, :, b].clone() for b in block_table[:n]]
        return KVPayload(layout=self.layout, num_tokens=num_tokens, blocks=blocks)

    def import_blocks(self, block_table: list[int], payload: KVPayload) -> None:
        """Blocks of another float dtype convert on the copy (a vLLM prefill's bf16 KV
        into a pool kept in fp32 on a CPU without native bf16)."""
        if not same_geometry(payload.layout, self.layout):
            raise ValueError(
                f"KV layout {payload.layout} does not match this engine's {self.layout}"
            )
        for b, block in zip(block_table, payload.blocks, strict=False):
            self.kv_cache[:, :, b].copy_(block)
