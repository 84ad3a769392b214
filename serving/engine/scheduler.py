"""Continuous batching: which sequences run in the next engine step.

Sequences join as soon as blocks allow and leave the moment they finish. A step is either
a prefill step (sequences with more than one token to compute, up to a token budget) or a
decode step (every running sequence computes its one newest token). When the pool runs
dry, the most recently admitted sequence is preempted and later recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.engine.block_pool import BlockPool
from serving.engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence]
    num_scheduled_tokens: list[int]
    is_prefill: bool
    preempted: list[Sequence] = field(default_factory=list)


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
    ):
        self.pool = block_pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.on_admit = on_admit  # copies imported KV into the sequence's fresh blocks
        self.on_release = on_release  # drops what staged KV holds for the sequence
        # Staged KV: demote running sequences' older blocks to make `n` blocks fit, before
        # anything is preempted or refused.
        self.relieve = relieve
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
        self.pool.free(seq.block_table)  # skips holes (blocks held quantized elsewhere)
        seq.block_table = []
        self.on_release(seq)

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            needed = blocks_for(seq.num_tokens, self.block_size)
            # Keep one spare block per running sequence so admissions don't force preemptions.
            if not self.pool.can_allocate(needed + len(self.running)):
                self.relieve(self.running, needed + len(self.running))
            if not self.pool.can_allocate(needed + len(self.running)):
                if self.running or not self.pool.can_allocate(needed):
                    break
            self.waiting.popleft()
            seq.block_table = self.pool.allocate(needed)
            seq.num_computed_tokens = 0
            if seq.kv_import is not None:
                self.on_admit(seq)
                seq.num_computed_tokens = seq.kv_import.num_tokens
                seq.kv_import = None
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)

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
        preempted: list[Sequence] = []
        for seq in list(self.running):
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
        if not self.running:
            return SchedulerOutput([], [], is_prefill=False, preempted=preempted)
        return SchedulerOutput(
            list(self.running), [1] * len(self.running), is_prefill=False, preempted=preempted
        )
