"""A prefill engine whose forward pass is vLLM's.

Our `LLMEngine` keeps doing what a prefill replica relies on (admission, block
accounting, stop rules, step stats, KV export after the first token); its model runner is
`VllmPrefillRunner`, which hands each scheduled prompt to vLLM and returns logits that put
all mass on vLLM's sampled first token, so our sampler reproduces vLLM's choice. The KV
that vLLM computed comes back through our connector and is what `export_blocks` returns.
"""

from __future__ import annotations

from typing import Any

import torch

from serving.backends.base import BackendContext, BackendInfo
from serving.backends.vllm.prefill import VllmPrefill
from serving.engine.engine import LLMEngine
from serving.engine.scheduler import SchedulerOutput
from serving.kv.block_format import KVLayout, KVPayload
from serving.messages import Role
from serving.models.arch import LlamaArch


class VllmPrefillRunner:
    def __init__(self, vllm: VllmPrefill, arch: LlamaArch, num_blocks: int, block_size: int):
        self.vllm = vllm
        self.arch = arch
        self.block_size = block_size
        self.layout = KVLayout(
            arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size, "bfloat16"
        )
        # vLLM owns the real cache; the engine's bookkeeping only needs the pool's shape,
        # so this is one element broadcast to it (no memory; never written at baseline)
        self.kv_cache = torch.zeros((), dtype=torch.bfloat16).expand(
            arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim
        )
        self.last_importance: torch.Tensor | None = None
        self._exports: list[KVPayload] = []

    @property
    def kv_bytes(self) -> int:
        return 0

    def execute(
        self, batch: SchedulerOutput, staged: Any = None, importance_layer: int = -1
    ) -> torch.Tensor:
        if not batch.is_prefill:
            raise RuntimeError("the vllm backend only prefills (a decode step reached it)")
        logits = torch.full((len(batch.seqs), self.arch.vocab_size), float("-inf"))
        self._exports.clear()
        # one prompt at a time: the connector's hand-over is per request
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_scheduled_tokens, strict=True)):
            ids = seq.token_ids(0, seq.num_computed_tokens + n)
            token, payload = self.vllm.prefill(ids, seq.params)
            logits[i, token] = 0.0
            self._exports.append(payload)
        return logits

    def export_blocks(self, block_table: list[int], num_tokens: int) -> KVPayload:
        """The KV vLLM computed for the next exported sequence of this step (in batch order)."""
        payload = self._exports.pop(0)
        if payload.num_tokens != num_tokens:
            raise RuntimeError(f"vLLM's KV covers {payload.num_tokens} tokens, not {num_tokens}")
        return payload

    def import_blocks(self, block_table: list[int], payload: KVPayload) -> None:
        """A prompt continuing a stored prefix: vLLM recomputes it (its own prefix cache may
        hit), so there is nothing to copy."""


def build(ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    if ctx.role is not Role.PREFILL:
        raise ValueError(
            "backend vllm serves the prefill role only; decode on torch or onnxruntime"
        )
    cfg = ctx.config
    engine_config = cfg.engine_config()
    vllm = VllmPrefill(
        ctx.model_path, block_size=engine_config.block_size, max_model_len=cfg.model.max_model_len
    )
    arch = LlamaArch.from_folder(ctx.model_path)
    runner = VllmPrefillRunner(vllm, arch, engine_config.num_blocks, engine_config.block_size)
    engine = LLMEngine(None, engine_config, arch.eos_token_ids, runner=runner)  # type: ignore[arg-type]
    return engine, BackendInfo("vllm", "cpu", "vLLM prefill, KV through InferosStoreConnector")
