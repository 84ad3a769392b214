"""Calibration for GPTQ (`gptq.py`): the second moment of each linear layer's inputs over
calibration text, gathered one decoder layer at a time so that each layer is calibrated on
what the already-quantized layers before it really produce (sequential GPTQ, as the paper
and AutoGPTQ do: errors of earlier layers are then partly compensated by later ones).

The text is cut into windows of `WINDOW` tokens, each run as one prefill over a scratch
paged cache through the shared layer API (`layer(x, cos, sin, layer_cache, meta)`), so any
family the engine runs calibrates the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from serving.models.attention import AttentionMetadata
from serving.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)

# 64 windows of 512 tokens (32k tokens): GPTQ's paper calibrates on 128 x 2048; for a
# 576-wide model 32k tokens give full-rank, stable Hessians in ~1 min of CPU.
WINDOW = 512
NUM_WINDOWS = 64
BLOCK_SIZE = 16

# (module key, weight [N, K] fp32, input second moment [K, K]) -> the weight to compute with
Quantize = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def calibration_windows(
    token_ids: list[int], window: int = WINDOW, count: int = NUM_WINDOWS
) -> list[torch.Tensor]:
    """`count` windows of `window` tokens spread evenly over `token_ids` (fewer if the text
    is short)."""
    available = len(token_ids) // window
    if available == 0:
        raise ValueError(f"calibration text has {len(token_ids)} tokens, fewer than {window}")
    picks = sorted({round(i * available / count) for i in range(count)} & set(range(available)))
    return [torch.tensor(token_ids[p * window : (p + 1) * window]) for p in picks]


def windows_from_text(folder: Path, text_file: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 1 << 30  # we window the text ourselves
    return calibration_windows(tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"])


def _prefill_meta(n: int) -> tuple[AttentionMetadata, int]:
    num_blocks = -(-n // BLOCK_SIZE)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(num_blocks)[None],
        context_lens=torch.tensor([n]),
        query_lens=[n],
        context_lens_list=[n],
        all_decode=False,
    )
    return meta, num_blocks


@torch.inference_mode()
def quantize_sequentially(model: CausalLM, windows: list[torch.Tensor], quantize: Quantize) -> None:
    """Run `quantize` on every plain linear layer of `model`'s decoder layers, layer after
    layer, with each layer's inputs computed by the layers before it as quantized (their
    weights replaced in place by what `quantize` returned)."""
    arch = model.arch
    started = time.monotonic()
    xs = [model.embed_tokens(ids) for ids in windows]
    dtype = xs[0].dtype
    rope = [_rope(model, len(ids), dtype) for ids in windows]
    for i, layer in enumerate(model.layers):
        linears = {
            f"layers.{i}.{name}": m for name, m in layer.named_modules() if type(m) is nn.Linear
        }
        moments = {key: torch.zeros(m.in_features, m.in_features) for key, m in linears.items()}

        handles = [
            m.register_forward_pre_hook(_accumulate_into(moments[k])) for k, m in linears.items()
        ]
        try:
            _run_layer(layer, i, xs, rope, arch)
        finally:
            for h in handles:
                h.remove()
        for key, m in linears.items():
            m.weight.copy_(quantize(key, m.weight.float(), moments[key]).to(m.weight.dtype))
        xs = _run_layer(layer, i, xs, rope, arch)
        logger.info(
            "GPTQ layer %d/%d (%.0f s)", i + 1, len(model.layers), time.monotonic() - started
        )


def _rope(model: CausalLM, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[n, 1, D]` of positions 0..n-1, as `CausalLM.forward` slices them."""
    return model.rope_cos[:n].unsqueeze(1).to(dtype), model.rope_sin[:n].unsqueeze(1).to(dtype)


def _accumulate_into(moment: torch.Tensor) -> Callable:
    """A forward pre-hook adding its layer's inputs' `x^T x` to `moment`."""

    def hook(_module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        moment.addmm_(x.T, x)

    return hook


def _run_layer(
    layer: nn.Module,
    index: int,
    xs: list[torch.Tensor],
    rope: list[tuple[torch.Tensor, torch.Tensor]],
    arch,
) -> list[torch.Tensor]:
    out = []
    for x, (cos, sin) in zip(xs, rope, strict=True):
        meta, num_blocks = _prefill_meta(x.shape[0])
        meta.layer = index
        cache = torch.zeros(
            2, num_blocks, BLOCK_SIZE, arch.num_kv_heads, arch.head_dim, dtype=x.dtype
        )
        out.append(layer(x, cos, sin, cache, meta))
    return out
