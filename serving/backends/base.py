"""What a prefill or decode replica needs from an engine backend.

A replica drives an `LLMEngine` (scheduler, sampler, KV exchange) on its engine thread;
a backend supplies the part that touches a device, the `ModelBackend` (the torch
`ModelRunner` is one). A replica's load report and metrics read the engine, so every
backend reports KV bytes and step times the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from serving.kv.block_format import KVLayout, KVPayload

if TYPE_CHECKING:
    from serving.config import InferosConfig
    from serving.engine.scheduler import SchedulerOutput
    from serving.engine.staged_kv import StagedPlan
    from serving.messages import Role


class ModelBackend(Protocol):
    """Runs scheduled batches over a paged KV pool; called only from the engine thread.

    - `execute(batch)`: next-token logits `[num_sampling_rows, vocab]` (fp32), one per row
      of `batch.sampling_rows` (every row unless the scheduler says otherwise), for a
      prefill batch (each sequence's uncomputed tokens) or a decode batch (one token each),
      after writing
      the scheduled tokens' K/V into the pool slots of their block tables. The returned
      tensor is valid until the next call. A backend with `supports_mixed_batches = True`
      also takes both kinds of row in one batch, prompts in chunks (chunked prefill); the
      rest only ever see whole prompts, where every row samples.
    - `export_blocks(table, n)`: a copy of the blocks holding the first n tokens (prefill
      hands them to the store); `import_blocks(table, payload)`: copy a payload from the
      store into freshly allocated blocks (converting dtype / dequantizing as needed).
    - `kv_cache` `[L, 2, num_blocks, block_size, Hkv, D]`, `layout`, `kv_bytes`: the pool.
    """

    layout: KVLayout
    block_size: int
    kv_cache: torch.Tensor
    last_importance: torch.Tensor | None

    def execute(
        self,
        batch: SchedulerOutput,
        staged: StagedPlan | None = None,
        importance_layer: int = -1,
    ) -> torch.Tensor: ...

    def export_blocks(self, block_table: list[int], num_tokens: int) -> KVPayload: ...

    def import_blocks(self, block_table: list[int], payload: KVPayload) -> None: ...

    @property
    def kv_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class BackendContext:
    """Everything a backend factory gets: built on the replica's engine thread."""

    config: InferosConfig
    role: Role
    model_path: Path
    num_threads: int


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str  # torch | onnxruntime | vllm
    device: str  # what runs it: cpu, CPUExecutionProvider, DmlExecutionProvider, ...
    note: str = ""  # fallbacks taken at start, for logs and stats

    @property
    def metric_label(self) -> str:
        """Value of the `provider` label of `inferos:execution_provider_info`."""
        return f"{self.name}-{self.device}"
