"""Builds an `LLMEngine` whose model runner is the ONNX Runtime decode step."""

from __future__ import annotations

import dataclasses

from serving.backends.base import BackendContext, BackendInfo
from serving.backends.ort.export import ensure_exported
from serving.backends.ort.runner import OrtModelRunner, make_session
from serving.engine.engine import LLMEngine
from serving.models.arch import LlamaArch


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
    engine_config = dataclasses.replace(engine_config, kv_dtype="float32")
    engine = LLMEngine(None, engine_config, arch.eos_token_ids, runner=runner)
    note = ""
    if choice.missing:
        note = f"providers {list(choice.missing)} unavailable, fell back to {choice.first}"
    return engine, BackendInfo("onnxruntime", choice.first, note)
