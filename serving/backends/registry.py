"""Backend name → engine factory; each factory imports its packages only when called."""

from __future__ import annotations

import logging
from collections.abc import Callable

from serving.backends.base import BackendContext, BackendInfo
from serving.engine.engine import LLMEngine

logger = logging.getLogger(__name__)

Factory = Callable[[BackendContext], tuple[LLMEngine, BackendInfo]]


def _torch(ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    from serving.backends.torch_backend import build

    return build(ctx)


def _onnxruntime(ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    try:
        from serving.backends.ort.engine import build
    except ImportError as e:
        raise RuntimeError(
            "backend onnxruntime needs the 'ort' extra: pip install -e '.[ort]'"
        ) from e
    return build(ctx)


def _vllm(ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    try:
        from serving.backends.vllm.engine import build
    except ImportError as e:
        raise RuntimeError(
            "backend vllm needs vllm in the replica's interpreter: make vllm-setup creates "
            ".venv-vllm, which the prefill replica then runs under (serving/backends/vllm_env.py)"
        ) from e
    return build(ctx)


BACKENDS: dict[str, Factory] = {"torch": _torch, "onnxruntime": _onnxruntime, "vllm": _vllm}


def build_engine(name: str, ctx: BackendContext) -> tuple[LLMEngine, BackendInfo]:
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    engine, info = factory(ctx)
    logger.info(
        "%s engine on backend %s (%s)%s",
        ctx.role.value,
        info.name,
        info.device,
        f": {info.note}" if info.note else "",
    )
    return engine, info
