"""The torch engine: one synchronous `step()` = schedule → run the model → sample → update.

No threads or Ray here; `engine_thread.py` drives it from a serving process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from serving.engine.block_pool import BlockPool
from serving.engine.model_runner import ModelRunner
from serving.engine.sampler import sample
from serving.engine.scheduler import BatchScheduler, SchedulerOutput
from serving.engine.sequence import FinishReason, Sequence
from serving.kv.block_format import KVPayload
from serving.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    num_blocks: int = 1024
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int = 2048
    kv_dtype: str = "float32"


@dataclass(slots=True)
class StepOutput:
    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    kv_export: KVPayload | None = None
    error: str | None = None


@dataclass(slots=True)
class StepStats:
    num_seqs: int
    num_tokens: int
    is_prefill: bool
    duration_s: float


class LLMEngine:
    def __init__(
        self, model: LlamaForCausalLM, config: EngineConfig, eos_token_ids: tuple[int, ...]
    ):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.runner = ModelRunner(
            model, config.num_blocks, config.block_size, getattr(torch, config.kv_dtype)
        )
        self.block_pool = BlockPool(config.num_blocks)
        self.scheduler = BatchScheduler(
            self.block_pool,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            on_admit=lambda seq: self.runner.import_blocks(seq.block_table, seq.kv_import),
        )
        self.last_step: StepStats | None = None
        self.num_preemptions = 0

    # --- requests ------------------------------------------------------------------------
    def add_request(self, seq: Sequence) -> None:
        seq.max_model_len = min(seq.max_model_len, self.config.max_model_len)
        self.scheduler.add(seq)

    def abort(self, req_id: str) -> bool:
        return self.scheduler.remove(req_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # --- the loop body -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch is None or not batch.seqs:
            return []
        self.num_preemptions += len(batch.preempted)
        started = time.perf_counter()
        logits = self.runner.execute(batch)
        tokens = sample(logits, batch.seqs, self.eos_token_ids)
        outputs = self._update(batch, tokens)
        self.last_step = StepStats(
            num_seqs=len(batch.seqs),
            num_tokens=sum(batch.num_scheduled_tokens),
            is_prefill=batch.is_prefill,
            duration_s=time.perf_counter() - started,
        )
        return outputs

    def _update(self, batch: SchedulerOutput, tokens: list[int]) -> list[StepOutput]:
        outputs = []
        for seq, n, token in zip(batch.seqs, batch.num_scheduled_tokens, tokens, strict=True):
            seq.num_computed_tokens += n
            seq.output_token_ids.append(token)
            reason = self._finish_reason(seq, token)
            export = None
            if seq.export_kv:
                # A prefill engine hands the prompt's KV on after its first token.
                export = self.runner.export_blocks(seq.block_table, seq.num_computed_tokens)
            if reason is not None or seq.export_kv:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
            outputs.append(
                StepOutput(
                    req_id=seq.req_id,
                    new_token_ids=[token],
                    finished=reason is not None,
                    finish_reason=reason.value if reason else None,
                    num_prompt_tokens=len(seq.prompt_token_ids),
                    kv_export=export,
                )
            )
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            if (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids:
                return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= seq.max_model_len:
            return FinishReason.LENGTH
        return None

    # --- observability -------------------------------------------------------------------
    @property
    def kv_usage(self) -> float:
        return self.block_pool.usage
