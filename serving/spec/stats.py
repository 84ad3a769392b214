"""Speculative-decoding counters of one engine: totals (for the `inferos:spec_decode_*`
Prometheus counters) and per-request acceptance (for the replica's JSON stats).

Written by the engine thread only; readers on other threads see plain ints and copies.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

MAX_REQUESTS = 256  # per-request entries kept (most recent)


@dataclass(slots=True)
class RequestAcceptance:
    num_drafts: int = 0  # verify steps with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_dict(self) -> dict:
        rate = self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None
        mean_len = (
            1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else None
        )  # tokens emitted per verify step: accepted + the target's own
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "acceptance_rate": rate,
            "mean_accepted_length": mean_len,
        }


@dataclass(slots=True)
class SpecStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_spec_steps: int = 0  # engine steps that verified drafts
    num_plain_steps: int = 0  # decode steps the gate ran without drafts
    requests: OrderedDict[str, RequestAcceptance] = field(default_factory=OrderedDict)

    def record(self, req_id: str, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        while len(self.accepted_per_pos) < num_draft:
            self.accepted_per_pos.append(0)
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1
        entry = self.requests.get(req_id)
        if entry is None:
            entry = self.requests[req_id] = RequestAcceptance()
            if len(self.requests) > MAX_REQUESTS:
                self.requests.popitem(last=False)
        entry.num_drafts += 1
        entry.num_draft_tokens += num_draft
        entry.num_accepted_tokens += num_accepted

    def snapshot(self) -> dict:
        overall = RequestAcceptance(
            self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens
        ).as_dict()
        return overall | {
            "accepted_per_pos": list(self.accepted_per_pos),
            "num_spec_steps": self.num_spec_steps,
            "num_plain_steps": self.num_plain_steps,
            "requests": {rid: r.as_dict() for rid, r in list(self.requests.items())},
        }
