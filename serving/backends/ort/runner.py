"""ONNX Runtime model runner: the exported dense step over our paged KV pool.

Same contract as `serving.engine.model_runner.ModelRunner` (the engine's scheduler,
sampler and KV exchange are unchanged): `execute(batch)` returns next-token logits and
writes the new tokens' K/V into the pool; `import_blocks`/`export_blocks` copy KV blocks
in and out. Each step gathers the batch's blocks from the pool into one reused buffer,
binds every input and output to reused buffers through IOBinding, runs, and scatters the
new K/V back: steady-state steps allocate nothing on our side.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from serving.backends.buffer_pool import BufferPool
from serving.backends.kv_import import same_geometry, to_pool_block
from serving.backends.ort.export import input_names, output_names
from serving.backends.ort.providers import ProviderChoice, choose_providers
from serving.engine.scheduler import SchedulerOutput
from serving.engine.staged_kv import StagedPlan
from serving.kv.block_format import KVLayout, KVPayload
from serving.models.arch import LlamaArch

logger = logging.getLogger(__name__)

_NP = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}


def make_session(
    graph: Path, preference: list[str] | tuple[str, ...], num_threads: int
) -> tuple[ort.InferenceSession, ProviderChoice]:
    choice = choose_providers(preference, ort.get_available_providers())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A provider can be compiled in and still fail to load (no driver, no device): ORT
    # then drops it; try each in turn so the session always comes up, on CPU at worst.
    for i in range(len(choice.providers)):
        providers = list(choice.providers[i:])
        try:
            session = ort.InferenceSession(str(graph), opts, providers=providers)
        except Exception:
            if providers == ["CPUExecutionProvider"]:
                raise
            logger.warning("ONNX Runtime provider %s failed to start", providers[0], exc_info=True)
            continue
        used = session.get_providers()[0]
        if used != choice.first:
            logger.warning("ONNX Runtime provider %s unusable here; using %s", choice.first, used)
        return session, ProviderChoice(
            tuple(session.get_providers()), choice.requested, choice.missing
        )
    raise AssertionError("unreachable: the CPU provider always remains")


class OrtModelRunner:
    def __init__(
        self,
        session: ort.InferenceSession,
        arch: LlamaArch,
        num_blocks: int,
        block_size: int,
    ):
        self.session = session
        self.arch = arch
        self.block_size = block_size
        self.dtype = torch.float32  # the graph's dtype: CPU/DirectML kernels lack bf16 matmuls
        self.layout = KVLayout(
            num_layers=arch.num_layers,
            num_kv_heads=arch.num_kv_heads,
            head_dim=arch.head_dim,
            block_size=block_size,
            dtype="float32",
        )
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], as the torch runner
        self.kv_cache = torch.zeros(
            (arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim),
            dtype=self.dtype,
        )
        self.buffers = BufferPool()
        self._inputs = input_names(arch.num_layers)
        self._outputs = output_names(arch.num_layers)
        self.binding = session.io_binding()
        self.last_importance: torch.Tensor | None = None

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def kv_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    # --- one step ------------------------------------------------------------------------
    def execute(
        self, batch: SchedulerOutput, staged: StagedPlan | None = None, importance_layer: int = -1
    ) -> torch.Tensor:
        """fp32 logits `[num_seqs, vocab]` at each sequence's last scheduled token; the view
        stays valid until the next call. Decode steps run the batch at once; prefill steps
        (local prefill, recompute after preemption) run one sequence at a time, since their
        token counts differ.

        Staged KV (quantized units in the pool) is the torch runner's for now: units would
        be dequantized into `past` after the gather, the one place this runner reads KV.
        Attention mass for importance is not measured here (`last_importance` stays None).
        """
        if staged is not None:
            raise NotImplementedError(
                "staged KV (kv_cache.profile other than baseline) is not supported by the "
                "onnxruntime backend yet; use the torch backend for this role"
            )
        if not batch.is_prefill:
            return self._run(batch.seqs, 1)
        rows = [
            self._run([seq], n).clone()
            for seq, n in zip(batch.seqs, batch.num_scheduled_tokens, strict=True)
        ]
        return torch.cat(rows)

    def _run(self, seqs: list, num_new: int) -> torch.Tensor:
        bs, arch = self.block_size, self.arch
        b, t = len(seqs), num_new
        starts = [seq.num_computed_tokens for seq in seqs]  # tokens already in the pool
        nb = max(-(-s // bs) for s in starts)
        p = nb * bs
        pool = self.buffers
        input_ids = pool.get("input_ids", (b, t), torch.int64)
        positions = pool.get("position_ids", (b, t), torch.int64)
        past_mask = pool.get("past_mask", (b, p), torch.bool)
        tables = pool.get("block_tables", (b, max(nb, 1)), torch.int64)
        slots = pool.get("slots", (b * t,), torch.int64)
        tables.zero_()
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            input_ids[i] = torch.as_tensor(seq.token_ids(start, start + t))
            torch.arange(start, start + t, out=positions[i])
            table = seq.block_table
            used = -(-start // bs)
            if used:
                tables[i, :used] = torch.as_tensor(table[:used])
            for j in range(t):
                pos = start + j
                slots[i * t + j] = table[pos // bs] * bs + pos % bs
        torch.lt(torch.arange(p).expand(b, p), torch.as_tensor(starts)[:, None], out=past_mask)

        two_l = 2 * arch.num_layers
        block_numel = bs * arch.num_kv_heads * arch.head_dim
        token_numel = arch.num_kv_heads * arch.head_dim
        # past: every layer's K and V of the batch's blocks in one gather, [2L, B*nb, bs*H*D]
        past = pool.get("past", (two_l, b * nb, block_numel), self.dtype)
        if nb:
            torch.index_select(
                self.kv_cache.view(two_l, -1, block_numel), 1, tables[:, :nb].reshape(-1), out=past
            )
        present = pool.get("present", (two_l, b * t, token_numel), self.dtype)
        logits = pool.get("logits", (b, arch.vocab_size), torch.float32)

        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._bind(io.bind_input, "input_ids", input_ids)
        self._bind(io.bind_input, "position_ids", positions)
        self._bind(io.bind_input, "past_mask", past_mask)
        kv_shape_past = (b, p, arch.num_kv_heads, arch.head_dim)
        kv_shape_new = (b, t, arch.num_kv_heads, arch.head_dim)
        for k in range(two_l):
            self._bind(io.bind_input, self._inputs[3 + k], past[k], kv_shape_past)
            self._bind(io.bind_output, self._outputs[1 + k], present[k], kv_shape_new)
        self._bind(io.bind_output, "logits", logits)
        self.session.run_with_iobinding(io)

        # the new tokens' K/V into their pool slots, all layers at once
        flat = self.kv_cache.view(two_l, -1, token_numel)
        flat.index_copy_(1, slots, present)
        return logits

    @staticmethod
    def _bind(fn, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
        assert tensor.is_contiguous()
        fn(name, "cpu", 0, _NP[tensor.dtype], list(shape or tensor.shape), tensor.data_ptr())

    # --- KV exchange ---------------------------------------------------------------------
    def export_blocks(self, block_table: list[int], num_tokens: int) -> KVPayload:
        n = -(-num_tokens // self.block_size)
        blocks = [self.kv_cache[:, :, b].clone() for b in block_table[:n]]
        return KVPayload(layout=self.layout, num_tokens=num_tokens, blocks=blocks)

    def import_blocks(self, block_table: list[int], payload: KVPayload) -> None:
        if not same_geometry(payload.layout, self.layout):
            raise ValueError(
                f"KV layout {payload.layout} does not match this engine's {self.layout}"
            )
        for b, block in zip(block_table, payload.blocks, strict=False):
            self.kv_cache[:, :, b].copy_(to_pool_block(block, self.dtype))
