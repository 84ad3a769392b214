"""A proposer that lives in the `draft` deployment (e.g. a draft model on another
device): one blocking call per engine step for the whole batch, made from the engine
thread. Each call carries every sequence's full token list, so the remote side needs no
accept/reject message to roll its KV back (see `draft_model.py`)."""

from __future__ import annotations

import logging

from serving.engine.sequence import Sequence
from serving.spec.proposer import Drafts

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0


class RemoteProposer:
    name = "deployment"

    def __init__(self, handle, method: str):
        self.handle = handle  # DeploymentHandle of the draft deployment
        self.name = f"{method}@deployment"

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        response = self.handle.propose.remote(
            [s.req_id for s in seqs], [s.prompt_token_ids + s.output_token_ids for s in seqs], ks
        )
        tokens = response.result(timeout_s=CALL_TIMEOUT_S)
        return Drafts([list(t)[:k] for t, k in zip(tokens, ks, strict=True)])

    def release(self, req_id: str) -> None:
        self.handle.release.remote(req_id)  # fire and forget: the draft frees its KV
