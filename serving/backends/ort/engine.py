"""Builds an `LLMEngine` whose model runner is the ONNX Runtime decode step."""

from __future__ import annotations

import dataclasses
import logging

from serving.backends.base import BackendContext, BackendInfo
from serving.backends.ort.export import ensure_exported
from serving.backends.ort.runner import OrtModelRunner, make_session
from serving.engine.engine import LLMEngine
from serving.engine.sequence import Sequence
from serving.models.arch import LlamaArch

logger = logging.getLogger(__name__)


class OrtLLMEngine(LLMEngine):
    """Keeps the KV at full precision: quantized units (staged KV) are read by the torch
    runner's attention only, so profile changes — run-time or per request — are declined
    here with a warning instead of failing every later step."""

    _warned = False

    def _decline(self, profile: str | None) -> None:
        if not self._warned:
            logger.warning(
                "KV profile %s ignored: the onnxruntime backend keeps KV at baseline", profile
            )
            self._warned = True

    def set_kv_policy(self, profile: str, window: int | None = None) -> None:
        if profile != "baseline":
            self._decline(profile)

    def add_request(self, seq: Sequence) -> None:
        if seq.params.kv_profile not in (None, "baseline"):
            self._decline(seq.params.kv_profile)
            seq.params = dataclasses.replace(seq.params, kv_profile="baseline")
        super().add_request(seq)


def build(ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    cfg = ctx.config
    settings = getattr(cfg, ctx.role.value)
    max_positions = cfg.model.max_model_len + 1
    graph = ensure_exported(ctx.model_path, max_positions)
    session, choice = make_session(graph, settings.execution_providers, ctx.num_threads)
    arch = LlamaArch.from_folder(ctx.model_path)
    engine_config = cfg.engine_config()
    runner = OrtModelRunner(session, arch, engine_config.num_blocks, engine_config.block_size)
    # the graph runs in float32 whatever model.dtype says; the pool follows it
    engine_config = dataclasses.replace(engine_config, kv_dtype="float32", kv_profile="baseline")
    engine = OrtLLMEngine(None, engine_config, arch.eos_token_ids, runner=runner)
    note = ""
    if choice.missing:
        note = f"providers {list(choice.missing)} unavailable, fell back to {choice.first}"
    return engine, BackendInfo("onnxruntime", choice.first, note)
