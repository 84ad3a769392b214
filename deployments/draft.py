"""Draft deployment: hosts a speculative-decoding proposer apart from the decode replica
(`speculation.placement: deployment`), e.g. a draft model on another device.

Decode replicas call `propose` once per engine step with their whole batch. The default
placement is in-process (`serving/spec/`): on one CPU box a Serve handle call per step
(~4 ms measured) costs more than a draft step saves.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from ray import serve

from deployments.loopback import keep_replica_grpc_on_loopback
from serving.config import InferosConfig
from serving.logging_setup import configure_logging
from serving.models.loader import parse_dtype
from serving.spec.draft_model import DraftModelProposer
from serving.spec.factory import load_draft_model
from serving.spec.ngram import propose_ngram

logger = logging.getLogger(__name__)


class DraftServer:
    def __init__(self, config: dict, num_threads: int = 1):
        configure_logging()
        keep_replica_grpc_on_loopback()
        cfg = InferosConfig.model_validate(config)
        torch.set_num_threads(num_threads)
        self.settings = cfg.speculation
        self._lock = threading.Lock()  # several decode replicas may call at once
        self.proposer: DraftModelProposer | None = None
        if self.settings.method != "ngram":
            model = load_draft_model(
                self.settings,
                cfg.model.path,
                parse_dtype(cfg.model_dtype),
                cfg.model.max_model_len + self.settings.k_max + 1,
                cfg.model.int4_max_tokens if cfg.fast_kernels else 0,
            )
            self.proposer = DraftModelProposer(
                model,
                self.settings.draft_num_blocks,
                cfg.kv_cache.block_size,
                self.settings.draft_vocab_size,
            )
        self.num_calls = 0
        logger.info("draft replica ready: %s (pid %d)", self.settings.method, os.getpid())

    def propose(
        self, req_ids: list[str], contexts: list[list[int]], ks: list[int]
    ) -> list[list[int]]:
        """Up to ks[i] draft tokens after each context (prompt + output so far)."""
        with self._lock:
            self.num_calls += 1
            if self.proposer is None:
                s = self.settings
                return [
                    propose_ngram(c, k, s.ngram_max, s.ngram_min)
                    for c, k in zip(contexts, ks, strict=True)
                ]
            return self.proposer.propose_tokens(req_ids, contexts, ks)

    def release(self, req_id: str) -> None:
        with self._lock:
            if self.proposer is not None:
                self.proposer.release(req_id)

    def stats(self) -> dict:
        with self._lock:
            held = self.proposer.states if self.proposer is not None else {}
            return {
                "num_calls": self.num_calls,
                "method": self.settings.method,
                # sequences whose draft KV this replica still holds, and its blocks in use
                "num_sequences": len(held),
                "num_blocks_used": sum(len(st.block_table) for st in held.values()),
            }


DraftDeployment = serve.deployment(DraftServer, name="draft")
