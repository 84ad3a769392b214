"""A vLLM v1 KV connector (producer side) that copies each prompt's KV out of vLLM's paged
cache into our block format (`serving.kv.block_format`: `[L, 2, block_size, Hkv, D]`).

vLLM loads it by module path:
    KVTransferConfig(kv_connector="InferosStoreConnector", kv_role="kv_producer",
                     kv_connector_module_path="serving.backends.vllm.connector")
Scheduler side: for every request scheduled with its whole prompt, the metadata carries
its block ids and prompt length. Worker side: after each attention layer ran,
`save_kv_layer` gathers that request's K and V of the layer, at the places vLLM's kernel
ISA for this CPU keeps them (`serving.backends.vllm.cache_layout`). With the engine core in the
caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0) the result lands in `SAVED`, where the
prefill engine (`serving.backends.vllm.prefill`) takes it. Nothing is ever loaded: this is
the save half of the API only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from serving.backends.vllm.cache_layout import (
    BlockLayout,
    gather_block_tokens,
    probe_block_layout,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# req_id → layer index → (K, V) each [num_prompt_tokens, Hkv, D]
SAVED: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class _Save:
    req_id: str
    num_tokens: int
    block_ids: list[int]


@dataclass
class InferosConnectorMetadata(KVConnectorMetadata):
    saves: list[_Save] = field(default_factory=list)


def layer_layout(layer_name: str, kv_layer: torch.Tensor) -> BlockLayout:
    """The block layout of this layer's cache, for the ISA its attention layer runs with
    (the CPU backend sets `layer.isa` when it builds metadata)."""
    from vllm.forward_context import get_forward_context

    isa = getattr(get_forward_context().no_compile_layers.get(layer_name), "isa", None)
    if isa is None:
        raise RuntimeError(
            f"{layer_name} has no CPU attention ISA: the connector reads vLLM's CPU KV cache only"
        )
    _, num_kv_heads, block_size, two_d = kv_layer.shape
    return probe_block_layout(isa, num_kv_heads, block_size, two_d // 2, kv_layer.dtype)


class InferosStoreConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)

    # --- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return 0, False  # a producer never loads

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = InferosConnectorMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            n = len(req.prompt_token_ids or [])
            # whole prompt in this step (our prefill replicas keep prompts under the
            # token budget); a chunked prompt would need its later chunks too
            if (
                scheduler_output.num_scheduled_tokens.get(req.req_id, 0)
                >= n - req.num_computed_tokens
            ):
                meta.saves.append(_Save(req.req_id, n, list(req.block_ids[0])))
        return meta

    # --- worker side ---------------------------------------------------------------------
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, InferosConnectorMetadata)
        match = _LAYER.search(layer_name)
        if match is None:
            return
        layer = int(match.group(1))
        layout = layer_layout(layer_name, kv_layer)
        for save in meta.saves:
            SAVED.setdefault(save.req_id, {})[layer] = gather_block_tokens(
                kv_layer, layout, save.block_ids, save.num_tokens
            )

    def wait_for_save(self) -> None:
        return None  # copies are synchronous
