"""The torch engine: one synchronous `step()` = schedule → run the model → sample → commit.

Plain and speculative steps share the sampler (`serving.engine.sampler`) and the commit
path (`LLMEngine.commit`); a speculative step is attached with `attach_spec`.

No threads or Ray here; `engine_thread.py` drives it from a serving process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from serving.engine.block_pool import BlockPool
from serving.engine.logprobs import TokenLogprobs, pick, raw_logprobs
from serving.engine.model_runner import ModelRunner
from serving.engine.prefix_cache import PrefixCache
from serving.engine.sampler import sample
from serving.engine.scheduler import BatchScheduler, SchedulerOutput
from serving.engine.sequence import FinishReason, Sequence
from serving.engine.staged_kv import StagedKVManager
from serving.kv.block_format import KVPayload
from serving.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from serving.spec.decode_step import SpecDecodeStep

logger = logging.getLogger(__name__)

# Staged KV: levels are re-decided every this many decode steps, and attention mass is
# sampled on every IMPORTANCE_EVERY-th one (one extra QK^T on one layer).
REBALANCE_EVERY = 16
IMPORTANCE_EVERY = 4
# Prompt logprobs: positions whose logits are computed at once ([rows, vocab] fp32).
PROMPT_LOGPROBS_ROWS = 256


@dataclass(frozen=True, slots=True)
class EngineConfig:
    num_blocks: int = 1024
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int = 2048
    kv_dtype: str = "float32"
    kv_profile: str = "baseline"  # staged-KV profile (policies.kv_levels.PROFILES)
    kv_unit_tokens: int = 128  # tokens quantized together (a run of whole blocks)
    kv_spill_dir: str | None = None  # where originals of demoted units go; None = a tempdir
    # one token budget per step for decode rows and prompt chunks (where the runner can mix)
    chunked_prefill: bool = True
    # finished sequences' full KV blocks stay in the pool for later prompts that start the
    # same way (where the runner reads its KV through our block tables)
    prefix_caching: bool = True


@dataclass(slots=True)
class StepOutput:
    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    kv_export: KVPayload | None = None
    error: str | None = None
    # Per new token, where the request asked for logprobs (params.logprobs).
    logprobs: list[TokenLogprobs] | None = None
    # With the first token, where it asked for prompt logprobs: None for the first prompt
    # token (nothing precedes it), then one per prompt token.
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(slots=True)
class StepStats:
    num_seqs: int
    num_tokens: int
    is_prefill: bool
    duration_s: float


class LLMEngine:
    def __init__(
        self,
        model: LlamaForCausalLM | None,
        config: EngineConfig,
        eos_token_ids: tuple[int, ...],
        runner: ModelRunner | None = None,
    ):
        """`runner`: another backend's model runner (`serving.backends`), in place of a
        torch `ModelRunner` over `model`."""
        self.config = config
        self.eos_token_ids = eos_token_ids
        if runner is None:
            assert model is not None
            runner = ModelRunner(
                model, config.num_blocks, config.block_size, getattr(torch, config.kv_dtype)
            )
        self.runner = runner
        self.block_pool = BlockPool(config.num_blocks, self.runner.layout.bytes_per_block())
        self.prefix_cache: PrefixCache | None = None
        if config.prefix_caching and getattr(self.runner, "supports_prefix_cache", False):
            self.prefix_cache = PrefixCache(self.block_pool, config.block_size)
        self.staged = StagedKVManager(
            self.runner.kv_cache,
            self.block_pool,
            config.block_size,
            profile=config.kv_profile,
            spill_dir=Path(config.kv_spill_dir) if config.kv_spill_dir else None,
            unit_tokens=config.kv_unit_tokens,
        )
        self.scheduler = BatchScheduler(
            self.block_pool,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            on_admit=self._import,
            on_release=self.staged.release,
            relieve=self.staged.relieve,
            copy_block=self._copy_block,
            prefix_cache=self.prefix_cache,
            # a runner states it takes decode rows and prompt chunks in one forward pass
            chunked_prefill=config.chunked_prefill
            and getattr(self.runner, "supports_mixed_batches", False),
        )
        self.last_step: StepStats | None = None
        self.num_preemptions = 0
        self.num_decode_steps = 0
        self._spec: SpecDecodeStep | None = None  # see attach_spec
        self.importance_layer = self.runner.layout.num_layers // 2
        self.rebalance_every = REBALANCE_EVERY  # decode steps between level decisions

    # --- speculative decoding ------------------------------------------------------------
    @property
    def spec(self) -> SpecDecodeStep | None:
        """The attached speculative step, if any (read-only: see `attach_spec`)."""
        return self._spec

    def attach_spec(self, spec: SpecDecodeStep) -> None:
        """Run decode batches through `spec` from now on (it falls back to a plain step
        where it cannot speculate). Not a constructor argument: a `SpecDecodeStep` is built
        over this engine's runner, block pool and scheduler (a truncated draft shares the
        runner), which exist only once the engine does; and a decode replica gets its
        engine from the backend registry, then adds speculation where the backend allows."""
        if spec.engine is not self:
            raise ValueError("a SpecDecodeStep can only drive the engine it was built over")
        if self._spec is not None:
            raise RuntimeError("this engine already has a speculative step")
        self._spec = spec

    # --- requests ------------------------------------------------------------------------
    def add_request(self, seq: Sequence) -> None:
        seq.max_model_len = min(seq.max_model_len, self.config.max_model_len)
        if seq.params.prompt_logprobs is not None and not seq.output_token_ids:
            seq.kv_import = None  # a cached prefix has no logits: compute the whole prompt
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
        importance_layer = -1
        if not batch.is_prefill:
            self.num_decode_steps += 1
            if self.staged.active(batch.seqs):
                if self.num_decode_steps % self.rebalance_every == 0:
                    self.staged.rebalance(batch.seqs, self.block_pool.usage)
                if self.num_decode_steps % IMPORTANCE_EVERY == 0:
                    importance_layer = self.importance_layer
        # prefill steps too: a prompt may continue a cached prefix held quantized
        plan = self.staged.plan(batch.seqs) if self.staged.states else None
        # speculation reads the cache through plain block tables: not over quantized units
        if self.spec is not None and not batch.is_prefill and plan is None:
            spec_outputs = self.spec.step(batch)  # None: decode this batch plainly
            if spec_outputs is not None:
                return self._finish_decode(batch, spec_outputs, started)
        logits = self.runner.execute(batch, plan, importance_layer)
        if self.runner.last_importance is not None:
            self._record_importance(batch.seqs, self.runner.last_importance)
        self._record_prompt_logprobs(batch)
        sampling = [batch.seqs[row] for row in batch.sampling_rows]
        tokens, logprobs = self._sample(logits, sampling)
        outputs = self._commit_step(batch, tokens, logprobs)
        if self.spec is not None and not batch.is_prefill:
            return self._finish_decode(batch, outputs, started)
        self.last_step = StepStats(
            num_seqs=len(batch.seqs),
            num_tokens=sum(batch.num_scheduled_tokens),
            is_prefill=batch.is_prefill,
            duration_s=time.perf_counter() - started,
        )
        return outputs

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[list[TokenLogprobs] | None]]:
        """The rows' tokens, and the logprobs of those whose request asks for them (of the
        raw logits: taken before the sampler edits them in place)."""
        if not seqs:
            return [], []
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw = raw_logprobs(logits[want]) if want else None
        tokens = sample(logits, seqs, self.eos_token_ids)
        logprobs: list[list[TokenLogprobs] | None] = [None] * len(seqs)
        if raw is not None:  # one top-k for all rows, each cut to its request's N
            num_tops = [seqs[i].params.logprobs or 0 for i in want]
            picked = pick(raw, [tokens[i] for i in want], max(num_tops))
            for i, lp, n in zip(want, picked, num_tops, strict=True):
                logprobs[i] = [replace(lp, top=lp.top[:n])]
        return tokens, logprobs

    def _record_prompt_logprobs(self, batch: SchedulerOutput) -> None:
        """Logprobs of the prompt tokens this step computed, for requests asking for them:
        the logits at position p score prompt token p + 1. From the runner's last hidden
        states; a runner that keeps none (other backends) gives none."""
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_scheduled_tokens, strict=True):
            row_offset, offset = offset, offset + n
            num_top = seq.params.prompt_logprobs
            if num_top is None or seq.output_token_ids:
                continue
            if seq.prompt_logprobs is None:
                seq.prompt_logprobs = []
            start = seq.num_computed_tokens
            lo = max(start, len(seq.prompt_logprobs))  # recomputed after a preemption: kept
            hi = min(start + n, len(seq.prompt_token_ids) - 1)
            hidden = getattr(self.runner, "last_hidden", None)
            if hidden is None or lo >= hi or len(seq.prompt_logprobs) < start:
                continue
            # a few hundred positions at a time: a 4k-token chunk's logits would be 800 MB
            for a in range(lo, hi, PROMPT_LOGPROBS_ROWS):
                b = min(a + PROMPT_LOGPROBS_ROWS, hi)
                h = hidden[row_offset + a - start : row_offset + b - start]
                lp = raw_logprobs(self.runner.model.compute_logits(h))
                seq.prompt_logprobs.extend(pick(lp, seq.prompt_token_ids[a + 1 : b + 1], num_top))

    def _finish_decode(
        self, batch: SchedulerOutput, outputs: list[StepOutput], started: float
    ) -> list[StepOutput]:
        """Speculation configured: the step's cost and yield feed its on/off gate."""
        assert self.spec is not None
        duration = time.perf_counter() - started
        self.spec.observe(batch, outputs, duration)
        self.last_step = StepStats(len(batch.seqs), self.spec.last_num_tokens, False, duration)
        return outputs

    def _copy_block(self, src: int, dst: int) -> None:
        kv = self.runner.kv_cache  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        kv[:, :, dst].copy_(kv[:, :, src])

    def _import(self, seq: Sequence) -> None:
        assert seq.kv_import is not None
        self.staged.import_payload(seq, seq.kv_import, self.runner.import_blocks)

    def _record_importance(self, seqs: list[Sequence], mass: torch.Tensor) -> None:
        """`mass [num_seqs, blocks]`: attention each logical block received this step."""
        bs = self.config.block_size
        per_block = mass.tolist()
        for seq, row in zip(seqs, per_block, strict=True):
            self.staged.add_mass(seq, row[: -(-seq.num_tokens // bs)])

    def set_kv_policy(self, profile: str, window: int | None = None) -> None:
        """Run-time profile change; blocks move on the next rebalance."""
        self.staged.set_profile(profile, window)

    def _commit_step(
        self,
        batch: SchedulerOutput,
        tokens: list[int],
        logprobs: list[list[TokenLogprobs] | None],
    ) -> list[StepOutput]:
        """Commit a plain step: `tokens` (and `logprobs`) are those of the rows that sample,
        in row order; a prompt chunk that is not the prompt's last only counts as computed."""
        outputs = []
        sampled = dict(zip(batch.sampling_rows, zip(tokens, logprobs, strict=True), strict=True))
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_scheduled_tokens, strict=True)):
            if row in sampled:
                token, lp = sampled[row]
                outputs.append(self.commit(seq, [token], num_input_tokens=n, logprobs=lp))
            else:
                seq.num_computed_tokens += n
        return outputs

    def commit(
        self,
        seq: Sequence,
        tokens: list[int],
        num_input_tokens: int = 1,
        logprobs: list[TokenLogprobs] | None = None,
    ) -> StepOutput:
        """Commit the tokens one step accepted for `seq`, plain (one token) or speculative
        (1..k+1): append them up to and including the first that finishes the sequence
        (a stop id, EOS once `min_tokens` are out, `max_tokens`, `max_model_len`); advance
        its computed prefix; release it if done; return what was kept.

        `num_input_tokens`: tokens of `seq` the step computed before its first new token:
        a plain step's scheduled count (1 in decode, the chunk in prefill), 1 for a
        speculative step (its newest token). Every kept token but the last was an input of
        the same pass (a verified draft), so its KV is written too: a speculative step
        keeping 3 tokens advances the prefix by 1 + 2, and the last stays uncomputed.
        `logprobs`: one per token of `tokens` where the request asked for them."""
        if not tokens:
            raise ValueError("a step commits at least one token")
        new: list[int] = []
        reason = None
        for token in tokens:
            seq.output_token_ids.append(token)
            new.append(token)
            reason = self._finish_reason(seq, token)
            if reason is None and seq.grammar is not None and seq.grammar.advance(token):
                reason = FinishReason.STOP  # the structured output is complete
            if reason is not None:
                break
        seq.num_computed_tokens += num_input_tokens + len(new) - 1
        export = self._release_if_done(seq, reason)
        prompt_logprobs = None
        if seq.prompt_logprobs is not None:  # the first token: the prompt's go out with it
            prompt_logprobs = [None, *seq.prompt_logprobs]
            seq.prompt_logprobs = None
        return StepOutput(
            req_id=seq.req_id,
            new_token_ids=new,
            finished=reason is not None,
            finish_reason=reason.value if reason else None,
            num_prompt_tokens=len(seq.prompt_token_ids),
            kv_export=export,
            logprobs=logprobs[: len(new)] if logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
        )

    def _release_if_done(self, seq: Sequence, reason: FinishReason | None) -> KVPayload | None:
        """After `commit` took `seq`'s tokens of a step: if it is done here, its blocks go
        back, with its KV exported first where asked for. A prefill engine hands the
        prompt's KV on after its first token; a decode engine that prefilled a chat turn
        hands the finished turn's KV on for the next turn."""
        export = None
        if seq.export_kv or (reason is not None and seq.export_kv_at_finish):
            export = self.staged.export(
                seq, seq.num_computed_tokens, self.runner.layout, self.runner.export_blocks
            )
        if reason is not None or seq.export_kv:
            self.scheduler.finish(seq)
            seq.finish_reason = reason
        return export

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
