"""Continuous batching: which sequences run in the next engine step.

Sequences join as soon as blocks allow and leave the moment they finish. With
`chunked_prefill` (vLLM v1's unified schedule) one step shares one token budget
(`max_num_batched_tokens`) between every running sequence's newest token and chunks of
prompts still to compute, so a new prompt never stops the running streams and a long one
is computed over several steps. Without it (backends whose forward pass takes one kind of
batch), a step is either a prefill step (prompts up to the budget) or a decode step
(every running sequence's newest token). When the pool runs dry, the most recently
admitted sequence is preempted and later recomputed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.engine.block_pool import BlockPool
from serving.engine.prefix_cache import PrefixCache
from serving.engine.sequence import SeqStatus, Sequence

GROUP_WAIT_S = 0.5  # the longest the choices of one request wait for each other
_COMPUTING = object()  # `_prompt_source`: a sibling is computing the shared prompt


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence]
    num_scheduled_tokens: list[int]
    is_prefill: bool  # some row computes prompt tokens (a pure decode step if False)
    preempted: list[Sequence] = field(default_factory=list)
    # Rows that reach their sequence's newest token and so sample the next one (every
    # decode row; a prompt chunk only if it is the prompt's last); None = every row.
    sample_rows: list[int] | None = None

    @property
    def sampling_rows(self) -> list[int]:
        return list(range(len(self.seqs))) if self.sample_rows is None else self.sample_rows


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BatchScheduler:
    def __init__(
        self,
        block_pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        on_admit: Callable[[Sequence], None] = lambda seq: None,
        on_release: Callable[[Sequence], None] = lambda seq: None,
        relieve: Callable[[list[Sequence], int], bool] = lambda seqs, n: False,
        chunked_prefill: bool = False,
        copy_block: Callable[[int, int], None] = lambda src, dst: None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.pool = block_pool
        self.prefix_cache = prefix_cache
        self.chunked_prefill = chunked_prefill
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.on_admit = on_admit  # copies imported KV into the sequence's fresh blocks
        self.on_release = on_release  # drops what staged KV holds for the sequence
        # Staged KV: demote running sequences' older blocks to make `n` blocks fit, before
        # anything is preempted or refused.
        self.relieve = relieve
        self.copy_block = copy_block  # KV of pool block src into dst (copy-on-write)
        self.num_shared_prompt_blocks = 0  # blocks a choice shared instead of computing
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, req_id: str) -> Sequence | None:
        """Take a sequence out (abort or finish) and free its blocks."""
        for seq in self.running:
            if seq.req_id == req_id:
                self.running.remove(seq)
                self._release(seq)
                return seq
        for seq in self.waiting:
            if seq.req_id == req_id:
                self.waiting.remove(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:  # what it computed stays for later prompts
            computed = seq.token_ids(0, seq.num_computed_tokens)
            self.prefix_cache.insert(computed, seq.block_table)
        self.pool.free(seq.block_table)  # skips holes (blocks held quantized elsewhere)
        seq.block_table = []
        self.on_release(seq)

    def _admit_waiting(self) -> None:
        held: list[Sequence] = []  # choices waiting for a sibling to compute their prompt
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            source = self._prompt_source(seq)
            if source is _COMPUTING or self._group_incomplete(seq, held):
                held.append(self.waiting.popleft())
                continue
            shared = source.block_table[: self._num_shared_blocks(seq)] if source else []
            # taken first, so that making room for the rest cannot evict them
            cached = self.pool.share(self._cached_prefix(seq)) if source is None else []
            needed = blocks_for(seq.num_tokens, self.block_size) - len(shared) - len(cached)
            # Keep one spare block per running sequence so admissions don't force preemptions.
            if not self.pool.can_allocate(needed + len(self.running)):
                self.relieve(self.running, needed + len(self.running))
            if not self.pool.can_allocate(needed + len(self.running)):
                if self.running or not self.pool.can_allocate(needed):
                    self.pool.free(cached)
                    break
            self.waiting.popleft()
            seq.block_table = self.pool.share(shared) + cached + self.pool.allocate(needed)
            seq.num_computed_tokens = 0
            if source is not None:
                self.num_shared_prompt_blocks += len(shared)
                self._copy_partial_prompt_block(source, seq)
            elif cached:
                seq.num_computed_tokens = len(cached) * self.block_size
                seq.kv_import = None  # the pool holds at least as much
            elif seq.kv_import is not None:
                self.on_admit(seq)
                seq.num_computed_tokens = seq.kv_import.num_tokens
                seq.kv_import = None
            if self.prefix_cache is not None and source is None:
                self.prefix_cache.count(seq.num_tokens, len(cached) * self.block_size)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        self.waiting.extendleft(reversed(held))

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Pool blocks of `seq`'s longest cached prefix (not shared yet), or none: where a
        prefix cannot be used, or the KV it imports covers more."""
        if self.prefix_cache is None:
            return []
        if seq.params.prompt_logprobs is not None and not seq.output_token_ids:
            return []  # a cached prefix has no logits
        # at least its newest token is computed: its logits give the next token
        blocks = self.prefix_cache.match(seq.token_ids(0, seq.num_tokens - 1))
        imported = seq.kv_import.num_tokens if seq.kv_import is not None else 0
        if len(blocks) * self.block_size < max(imported, 1):
            return []
        return blocks

    # --- n > 1: the choices of one request share its prompt's KV --------------------------
    def _prompt_source(self, seq: Sequence) -> Sequence | object | None:
        """The running sibling whose computed prompt `seq` can share, `_COMPUTING` while
        one is still computing it (`seq` waits: computing it twice is the waste to avoid),
        or None (`seq` computes its prompt itself)."""
        if (
            seq.prompt_group is None
            or seq.kv_import is not None
            or seq.output_token_ids
            or seq.params.prompt_logprobs is not None  # a shared prefix has no logits
            or len(seq.prompt_token_ids) < 2
        ):
            return None
        last = len(seq.prompt_token_ids) - 1  # each choice computes it: its own first token
        computing = False
        for other in self.running:
            if other.prompt_group != seq.prompt_group:
                continue
            if other.prompt_token_ids != seq.prompt_token_ids:
                continue
            if any(b < 0 for b in other.block_table[: self._num_shared_blocks(seq) + 1]):
                continue  # demoted by staged KV: not in the pool to share
            if other.num_computed_tokens >= last:
                return other
            computing = True
        return _COMPUTING if computing else None

    def _group_incomplete(self, seq: Sequence, held: list[Sequence]) -> bool:
        """Whether `seq` waits for the other choices of its request to arrive (they come
        in separate calls, milliseconds apart): admitted together, the choices run in the
        same batches run after run, so a seeded request gives the same choices again (the
        numerics of a step depend on its batch size); never longer than GROUP_WAIT_S."""
        if seq.group_size <= 1 or seq.prompt_group is None:
            return False
        if time.monotonic() - seq.arrival_time > GROUP_WAIT_S:
            return False
        group = seq.prompt_group
        members = (*self.waiting, *self.running, *held)
        return sum(s.prompt_group == group for s in members) < seq.group_size

    def _num_shared_blocks(self, seq: Sequence) -> int:
        """Full blocks before the prompt's last token: never written again by anyone."""
        return (len(seq.prompt_token_ids) - 1) // self.block_size

    def _copy_partial_prompt_block(self, source: Sequence, seq: Sequence) -> None:
        """Copy-on-write at the first block the choices write differently: the prompt's
        last block (its last token and the choice's own tokens go there) is `seq`'s own,
        holding a copy of what `source` computed of it; `seq` then computes only the prompt's
        last token, whose logits give it its own first token."""
        last = len(seq.prompt_token_ids) - 1
        k = self._num_shared_blocks(seq)
        if last > k * self.block_size:  # the block holds computed prompt tokens: copy them
            self.copy_block(source.block_table[k], seq.block_table[k])
        seq.num_computed_tokens = last

    def _preempt_last(self) -> Sequence:
        victim = self.running.pop()
        self._release(victim)
        victim.num_computed_tokens = 0
        victim.status = SeqStatus.WAITING
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def schedule(self) -> SchedulerOutput | None:
        self._admit_waiting()
        if self.chunked_prefill:
            return self._schedule_mixed()
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        if prefills:
            chosen, counts, budget = [], [], self.max_num_batched_tokens
            for seq in prefills:
                n = seq.num_uncomputed_tokens
                if chosen and n > budget:
                    break
                chosen.append(seq)
                counts.append(n)
                budget -= n
            return SchedulerOutput(chosen, counts, is_prefill=True)
        preempted = self._grow_decoding(list(self.running))
        if not self.running:
            return SchedulerOutput([], [], is_prefill=False, preempted=preempted)
        return SchedulerOutput(
            list(self.running), [1] * len(self.running), is_prefill=False, preempted=preempted
        )

    def _grow_decoding(self, decoding: list[Sequence]) -> list[Sequence]:
        """Give each of `decoding` the block its newest token needs, demoting (staged KV)
        and then preempting the most recently admitted sequences where none is free;
        returns the preempted ones."""
        preempted: list[Sequence] = []
        for seq in decoding:
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            needed = blocks_for(seq.num_tokens, self.block_size) - len(seq.block_table)
            if needed > 0 and not self.pool.can_allocate(needed):
                self.relieve(self.running, needed)
            while needed > 0 and not self.pool.can_allocate(needed):
                victim = self._preempt_last()
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in self.running and needed > 0:
                seq.block_table.extend(self.pool.allocate(needed))
        return preempted

    def _schedule_mixed(self) -> SchedulerOutput:
        """Every decoding sequence's newest token first (a running stream never waits),
        then prompt chunks in admission order with what is left of the token budget.
        A prompt's blocks were all allocated at admission, so chunks need none."""
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        preempted = self._grow_decoding(decoding)
        seqs: list[Sequence] = []
        counts: list[int] = []
        budget = self.max_num_batched_tokens
        for seq in self.running:  # admission order; preempted ones are gone from it
            if seq.num_uncomputed_tokens == 1:
                seqs.append(seq)
                counts.append(1)
                budget -= 1
        is_prefill = False
        for seq in self.running:
            n = seq.num_uncomputed_tokens
            if n > 1 and budget > 0:
                seqs.append(seq)
                counts.append(min(n, budget))
                budget -= counts[-1]
                is_prefill = True
        sample_rows = [
            row
            for row, (seq, n) in enumerate(zip(seqs, counts, strict=True))
            if seq.num_computed_tokens + n >= seq.num_tokens
        ]
        return SchedulerOutput(seqs, counts, is_prefill, preempted, sample_rows)
