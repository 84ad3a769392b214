"""The torch engine (serving/engine) as a backend: the model in its configured dtype."""

from __future__ import annotations

from serving.backends.base import BackendContext, BackendInfo
from serving.engine.engine import LLMEngine
from serving.messages import Role
from serving.models.loader import load_model, parse_dtype


def build(ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    cfg = ctx.config
    model = load_model(
        ctx.model_path,
        parse_dtype(cfg.model_dtype),
        max_positions=cfg.model.max_model_len + 1,
        # prefill steps are large: only decode profits from the int4 path
        int4_max_tokens=cfg.model.int4_max_tokens
        if ctx.role is Role.DECODE and cfg.fast_kernels
        else 0,
        measured_dense=cfg.fast_kernels and cfg.model.dense_kernels == "measured",
        weights=cfg.model.weights,
        int4=cfg.model.int4_recipe(),
    )
    engine = LLMEngine(model, cfg.engine_config(), model.arch.eos_token_ids)
    return engine, BackendInfo("torch", "cpu")
