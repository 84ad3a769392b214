"""One speculative decode step of an `LLMEngine`: draft → verify in one target pass →
accept → roll back. The engine calls `step(batch)` for a decode batch and runs its plain
step when the answer is None; it reports every decode step's duration to `observe`.

Per sequence i with p_i = num_computed_tokens (its newest token is not computed yet) and
a draft of k_i tokens d_1..d_k:

1. blocks for positions p_i..p_i+k_i are reserved (k_i shrinks if the pool is short);
2. the target computes [newest, d_1..d_k] at positions p_i..p_i+k_i in ONE forward pass
   (paged attention takes multi-token queries over the cached context), giving the
   target's distribution after each of them;
3. `verify` keeps d_1..d_a and emits one more token from the target (residual or bonus);
4. the computed prefix is now p_i + a + 1 tokens; the K/V slots of rejected drafts lie
   beyond it and are overwritten when those positions are computed, and blocks beyond the
   sequence's length go back to the pool: the rollback.

The target distributions, seeds, penalties and min_tokens rule are the plain sampler's
(`serving.engine.sampler`), and the accepted tokens are committed by `LLMEngine.commit`,
as a plain step's are.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from policies.speculation import SpecController, SpecGate
from serving.engine.logprobs import pick, raw_logprobs
from serving.engine.sampler import distributions, position_generator, seeded_generator
from serving.engine.scheduler import SchedulerOutput, blocks_for
from serving.engine.sequence import Sequence
from serving.spec.constrained import constrain_drafts
from serving.spec.forward import make_metadata, run_layers
from serving.spec.proposer import Drafts, Proposer, newest_token
from serving.spec.stats import SpecStats
from serving.spec.verify import verify

if TYPE_CHECKING:
    from serving.engine.engine import LLMEngine, StepOutput

logger = logging.getLogger(__name__)

PRUNE_EVERY_N_STEPS = 64


class SpecDecodeStep:
    def __init__(
        self,
        engine: LLMEngine,
        proposer: Proposer,
        k_max: int = 3,
        gate: SpecGate | None = None,
        enabled: bool = True,
    ):
        self.engine = engine
        self.proposer = proposer
        self.k_max = k_max
        self.gate = gate or SpecGate()
        self.enabled = enabled  # the run-time switch (RuntimePolicy.speculation)
        self.stats = SpecStats()
        self.controllers: dict[str, SpecController] = {}
        self.last_num_tokens = 0  # tokens the target computed in the last step
        self._speculated = False
        self._num_steps = 0

    # --- the step --------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, batch: SchedulerOutput) -> list[StepOutput] | None:
        self._speculated = False
        self._num_steps += 1
        if self._num_steps % PRUNE_EVERY_N_STEPS == 0:
            self._prune()
        seqs = batch.seqs
        if not self.enabled or not seqs:
            return None
        # staged KV keeps some blocks quantized outside the pool (negative ids): the
        # gathers here do not read them, so such batches decode plainly
        if any(b < 0 for s in seqs for b in s.block_table):
            return None
        staged = getattr(self.engine, "staged", None)
        if staged is not None and staged.active(seqs):
            return None
        if not self.gate.should_speculate(len(seqs)):
            return None
        ks = self._reserve(seqs, [self._controller(s).next_k() for s in seqs])
        if not any(ks):
            self._trim(seqs)
            return None
        # a constrained sequence's draft ends before its first token the grammar forbids
        drafts = constrain_drafts(seqs, self.proposer.propose(seqs, ks))
        if not any(drafts.tokens):  # e.g. no n-gram matched anywhere
            self._trim(seqs)
            return None
        logits = self._score(seqs, drafts)
        self._speculated = True
        self.stats.num_spec_steps += 1
        return self._accept(seqs, drafts.tokens, logits)

    def observe(self, batch: SchedulerOutput, outputs: list[StepOutput], duration_s: float) -> None:
        """Every decode step, speculative or not: feeds the gate and the controllers."""
        num_out = sum(len(o.new_token_ids) for o in outputs)
        if not self.enabled:
            return
        self.gate.observe(len(batch.seqs), self._speculated, num_out, duration_s)
        if not self._speculated:
            self.stats.num_plain_steps += 1
            self.last_num_tokens = len(batch.seqs)
            for seq in batch.seqs:
                self._controller(seq).update(0, 0)
            for out in outputs:
                if out.finished:
                    self._forget(out.req_id)

    # --- pieces ----------------------------------------------------------------------
    def _controller(self, seq: Sequence) -> SpecController:
        c = self.controllers.get(seq.req_id)
        if c is None:
            c = self.controllers[seq.req_id] = SpecController(k_max=self.k_max)
        return c

    def _reserve(self, seqs: list[Sequence], ks: list[int]) -> list[int]:
        """Cap each k by the request's limits and give its block table room for the drafts;
        a draft shrinks to the free slots of its last block when the pool is short."""
        pool, bs = self.engine.block_pool, self.engine.config.block_size
        out = []
        for seq, k in zip(seqs, ks, strict=True):
            left = min(
                seq.params.max_tokens - seq.num_output_tokens, seq.max_model_len - seq.num_tokens
            )
            k = max(0, min(k, left - 1))
            extra = blocks_for(seq.num_tokens + k, bs) - len(seq.block_table)
            if extra > 0:
                if pool.can_allocate(extra):
                    seq.block_table.extend(pool.allocate(extra))
                else:
                    k = max(0, len(seq.block_table) * bs - seq.num_tokens)
            out.append(k)
        return out

    def _score(self, seqs: list[Sequence], drafts: Drafts) -> torch.Tensor:
        """fp32 target logits `[sum(k_i + 1), vocab]` after [newest, d_1..d_k] of each."""
        model = self.engine.runner.model
        kv_cache = self.engine.runner.kv_cache
        counts = [len(t) + 1 for t in drafts.tokens]
        positions, meta = make_metadata(
            [s.block_table for s in seqs],
            [s.num_computed_tokens for s in seqs],
            counts,
            self.engine.config.block_size,
        )
        if drafts.hidden is not None:
            if drafts.hidden.shape[0] != sum(counts):
                raise RuntimeError("draft hidden states do not match the drafted tokens")
            x = drafts.hidden
        else:
            ids = [
                t for s, d in zip(seqs, drafts.tokens, strict=True) for t in [newest_token(s), *d]
            ]
            x = model.embed_tokens(torch.tensor(ids, dtype=torch.long))
        h = run_layers(model, x, positions, kv_cache, meta, drafts.start_layer, len(model.layers))
        self.last_num_tokens = sum(counts)
        return model.compute_logits(model.norm(h))

    def _accept(
        self, seqs: list[Sequence], drafts: list[list[int]], logits: torch.Tensor
    ) -> list[StepOutput]:
        engine = self.engine
        outputs = []
        offset = 0
        for seq, draft in zip(seqs, drafts, strict=True):
            n = len(draft) + 1
            rows = logits[offset : offset + n]
            offset += n
            num_top = seq.params.logprobs
            raw = raw_logprobs(rows) if num_top is not None else None  # before any edit
            # the plain sampler's distribution at each of the n positions, row j after
            # draft[:j] (penalties, bad words and min_tokens count those as output)
            probs = distributions(rows, seq, engine.eos_token_ids, draft)
            seeded = seq.params.seed is not None and not seq.params.greedy
            result = verify(
                probs,
                None,
                torch.tensor(draft, dtype=torch.long),
                seeded_generator(seq),
                seq.params.greedy,
                # a seeded request draws what plain decoding draws: reproducible
                [position_generator(seq, i) for i in range(n)] if seeded else None,  # type: ignore[misc]
            )
            if draft:
                self._controller(seq).update(len(draft), result.num_accepted_drafts)
            self.stats.record(seq.req_id, len(draft), result.num_accepted_drafts)
            # input: the newest token; the accepted drafts were inputs of the same pass
            tokens = result.accepted_tokens
            # token i of the emitted ones was drawn at row i
            logprobs = pick(raw, tokens, num_top or 0) if raw is not None else None
            out = engine.commit(seq, tokens, num_input_tokens=1, logprobs=logprobs)
            if out.finished:
                self._forget(seq.req_id)
            else:
                self._trim([seq])
            outputs.append(out)
        return outputs

    def _trim(self, seqs: list[Sequence]) -> None:
        """Give back blocks beyond what each sequence's tokens occupy (the rollback)."""
        bs = self.engine.config.block_size
        for seq in seqs:
            keep = blocks_for(seq.num_tokens, bs)
            if len(seq.block_table) > keep:
                self.engine.block_pool.free(seq.block_table[keep:])
                del seq.block_table[keep:]

    def _forget(self, req_id: str) -> None:
        self.controllers.pop(req_id, None)
        self.proposer.release(req_id)

    def _prune(self) -> None:
        """Drop per-sequence state of requests that left without a speculative step."""
        sched = self.engine.scheduler
        live = {s.req_id for s in sched.running} | {s.req_id for s in sched.waiting}
        for req_id in [r for r in self.controllers if r not in live]:
            self._forget(req_id)

    def snapshot(self) -> dict:
        return {
            "enabled": self.enabled,
            "method": self.proposer.name,
            "k_max": self.k_max,
        } | self.stats.snapshot()
