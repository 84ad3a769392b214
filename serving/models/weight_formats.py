"""`model.weights`: which form a model's linear weights take, applied at load.

- `auto`: today's behaviour: weights that came from a 4-bit GGUF (on a Q4_1 grid) run on
  the lossless int4 repack (`int4.py`) and a Q8_0 LM head on its int8 codes (`q8_head`);
  anything else dense.
- `bf16`: dense only, in the model's dtype (bf16 by default): the quality reference.
- `int8`: every linear layer and the LM head per-output-channel int8 (`weight_quant`).
- `int4`: every linear layer group-wise int4 except the attention's qkv projection, which
  stays per-channel int8 like the LM head (llama.cpp's 4-bit mixes likewise keep the output
  matrix and attn_v at 6-8 bits). Round-to-nearest by default; with a calibration text
  (`model.int4_calibration`) GPTQ in act order (`gptq.py`), calibrated layer after layer on
  that text (`calibration.py`). `Int4Recipe` holds these choices.

For int8/int4 the model's own weights become the dequantized quantized ones, so every
path (the kernels for small steps, the dense matmul for prefill, a prefill replica that
never runs the kernels, the speculative vocabulary slice of the head) computes with the
same weights. Quantized tensors are cached on disk (`weight_cache`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from serving.models import weight_cache
from serving.models.calibration import WINDOW, quantize_sequentially, windows_from_text
from serving.models.gptq import gptq_int4
from serving.models.int4 import HybridInt4Linear, int4_kernel_available
from serving.models.int8 import Int8Linear, group_scales, int8_kernel_fits, use_measured_int8
from serving.models.q8_head import install_q8_head
from serving.models.weight_quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4_groups,
    quantize_int8_per_channel,
)

logger = logging.getLogger(__name__)

WeightFormat = Literal["auto", "bf16", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
QUANTIZED = ("int8", "int4")
# Inputs per int4 (scale, zero): 32, the finest group torch's int4 kernel takes. Measured
# on SmolLM2 at context 2048 (benchmarks/results/2026-12-05/weights): group 32 costs
# +0.41 % ppl (the int8 head ~0.1 % of it), group 64 +38.7 % for 10 % fewer bytes (4.5
# against 5 bits a weight with bf16 scale and zero) and ~5 % faster layers at 1-8 rows:
# a 135M model is that sensitive, and a GGUF Q4_0/Q4_1 source (int4 in groups of 32) is
# re-quantized in groups of 32 almost onto its own grid.
INT4_GROUP_SIZE = 32
# Layers `int4` keeps at int8 per channel: the attention's input projection. Off the GGUF
# grid (benchmarks/results/2026-12-06/int4-gptq) round-to-nearest int4 on qkv alone costs
# SmolLM2 +10.6 % ppl, gate_up +5.2 %, down +6.9 %, o +1.2 %; qkv is ~16 % of a layer's
# weights, so int8 there costs ~0.5 bit a weight and, with GPTQ on the rest, is what
# brings the format within 5 %.
INT8_LAYERS = ("qkv_proj",)
HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Int4Recipe:
    """How `weights: int4` quantizes (`model.int4_*`)."""

    group_size: int = INT4_GROUP_SIZE
    calibration: Path | None = None  # GPTQ (act order) on this text; None: round-to-nearest
    int8_layers: tuple[str, ...] = INT8_LAYERS  # module names kept at int8 per channel

    def keeps_int8(self, key: str) -> bool:
        """Whether `<module>.weight` `key` stays int8 by the recipe: the head or a listed
        module (a layer whose inputs the group does not divide stays int8 as well)."""
        parts = key.split(".")
        return key == HEAD or (len(parts) > 1 and parts[-2] in self.int8_layers)

    def tag(self) -> str:
        """The cache entry's name part: what changes the tensors, the text by its bytes."""
        tag = f"int4-g{self.group_size}"
        if self.int8_layers:
            tag += "-q8" + "+".join(sorted(self.int8_layers))
        if self.calibration is not None:
            tag += f"-gptq-{hashlib.sha256(Path(self.calibration).read_bytes()).hexdigest()[:12]}"
        return tag


def _linear_keys(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, child name, `<module>.weight` key) of every plain `nn.Linear`."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                yield (
                    parent,
                    name,
                    f"{parent_name}.{name}.weight" if parent_name else f"{name}.weight",
                )


def _head_source_key(source: dict[str, torch.Tensor]) -> str:
    """Where the head's weight is in a family's state dict: a tied head is the embedding."""
    return HEAD if HEAD in source else "embed_tokens.weight"


def quantize_tensors(
    weights: dict[str, torch.Tensor], fmt: str, recipe: Int4Recipe = Int4Recipe()
) -> dict[str, torch.Tensor]:
    """Codes and scales of each `<module>.weight` of `weights` in `fmt`, round-to-nearest:
    int4 where the format is int4, the recipe does not keep the layer int8 and the input
    count divides by the group; int8 per channel otherwise. Keys `<name>.q` /
    `.scales_and_zeros` (int4) or `<name>.codes` / `.scales` (int8): the cache file's
    layout."""
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        if fmt == "int4" and not recipe.keeps_int8(name) and w.shape[1] % recipe.group_size == 0:
            q, sz = quantize_int4_groups(w, recipe.group_size)
            out[f"{name}.q"] = q.to(torch.uint8)  # 0..15: a byte each on disk
            out[f"{name}.scales_and_zeros"] = sz
        else:
            codes, scales = quantize_int8_per_channel(w)
            out[f"{name}.codes"], out[f"{name}.scales"] = codes, scales
    return out


@dataclass
class QuantizedWeights:
    """Codes and scales by `<module>.weight` name (`lm_head.weight` for the head)."""

    tensors: dict[str, torch.Tensor]
    group_size: int

    def names(self) -> set[str]:
        return {k.rsplit(".", 1)[0] for k in self.tensors}

    def int4(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if f"{name}.q" not in self.tensors:
            return None
        return self.tensors[f"{name}.q"].to(torch.int32), self.tensors[f"{name}.scales_and_zeros"]

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if f"{name}.codes" not in self.tensors:
            return None
        return self.tensors[f"{name}.codes"], self.tensors[f"{name}.scales"]

    def dequantized(self, name: str) -> torch.Tensor:
        packed = self.int4(name)
        return dequantize_int4(*packed) if packed is not None else dequantize_int8(*self.int8(name))


def quantize_model_weights(
    folder: Path,
    model: nn.Module,
    source: dict[str, torch.Tensor],
    fmt: str,
    recipe: Int4Recipe = Int4Recipe(),
) -> QuantizedWeights:
    """The quantized form of `model`'s linear weights (and head) from `source` (fp32, as
    loaded), from the cache when it holds them for this folder's current files (and the
    int4 recipe, calibration text included)."""
    head_key = _head_source_key(source)
    names = [key for *_, key in _linear_keys(model) if key in source or key == HEAD]

    def compute() -> dict[str, torch.Tensor]:
        weights = {n: source[head_key] if n == HEAD else source[n] for n in names}
        out = quantize_tensors(weights, fmt, recipe)
        if fmt == "int4" and recipe.calibration is not None:
            out.update(gptq_tensors(folder, recipe, out))
        return out

    tag = recipe.tag() if fmt == "int4" else fmt
    return QuantizedWeights(weight_cache.cached_tensors(folder, tag, compute), recipe.group_size)


def gptq_tensors(
    folder: Path, recipe: Int4Recipe, rounded: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """GPTQ codes (act order) of every decoder-layer weight `rounded` (round-to-nearest,
    `quantize_tensors`) holds as int4, calibrated on windows of the recipe's text through
    the dense fp32 model, one layer after another; the int8 layers computing with their
    int8 values meanwhile, so that later layers see what they will see."""
    from serving.models.loader import load_model  # the loader imports this module

    windows = windows_from_text(folder, Path(recipe.calibration))
    model = load_model(folder, torch.float32, max_positions=WINDOW, weights="bf16")
    out: dict[str, torch.Tensor] = {}

    def quantize(key: str, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
        name = f"{key}.weight"
        if f"{name}.q" not in rounded:
            return dequantize_int8(rounded[f"{name}.codes"], rounded[f"{name}.scales"])
        q, sz = gptq_int4(weight, hessian, recipe.group_size, act_order=True)
        out[f"{name}.q"], out[f"{name}.scales_and_zeros"] = q.to(torch.uint8), sz
        return dequantize_int4(q, sz)

    logger.info(
        "GPTQ int4 of %s on %d windows of %s (once: cached)",
        folder.name,
        len(windows),
        recipe.calibration,
    )
    quantize_sequentially(model, windows, quantize)
    return out


def dequantized_source(
    source: dict[str, torch.Tensor], quantized: QuantizedWeights
) -> dict[str, torch.Tensor]:
    """`source` with each quantized weight replaced by its dequantized value (the head's
    written where the family keeps it: the embedding of a tied model)."""
    out = dict(source)
    for name in quantized.names():
        out[_head_source_key(source) if name == HEAD else name] = quantized.dequantized(name)
    return out


def install_int4(model: nn.Module, quantized: QuantizedWeights, max_tokens: int) -> int:
    """Swap each plain linear layer quantized to int4 for a `HybridInt4Linear` (before the
    dense paths are chosen, which it then gets, as the GGUF repack does)."""
    if max_tokens <= 0 or not int4_kernel_available():
        return 0
    swapped = 0
    for parent, name, key in _linear_keys(model):
        packed = quantized.int4(key)
        if packed is not None:
            layer = HybridInt4Linear(
                getattr(parent, name), *packed, max_tokens, quantized.group_size
            )
            setattr(parent, name, layer)
            swapped += 1
    if swapped:
        logger.info("weights int4 (group %d): %d linear layers", quantized.group_size, swapped)
    return swapped


def install_int8(
    model: nn.Module,
    quantized: QuantizedWeights,
    max_tokens: int,
    dtype: torch.dtype,
    measured: bool,
) -> int:
    """Put every int8-quantized layer (after its dense path is chosen: `dense_kernels`) on
    the int8 kernel for small steps, and the head on it for the rows it wins at."""
    if max_tokens <= 0:
        return 0
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            key = f"{parent_name}.{name}.weight" if parent_name else f"{name}.weight"
            packed = quantized.int8(key)
            if key == HEAD or packed is None or isinstance(child, (HybridInt4Linear, Int8Linear)):
                continue
            if hasattr(child, "weight") and int8_kernel_fits(child.weight):
                setattr(parent, name, Int8Linear(child, *packed, max_tokens))
                swapped += 1
    if swapped and measured:
        use_measured_int8(model, dtype, max_tokens)
    head = quantized.int8(HEAD)
    # a head with a bias (GPT-J) stays dense on its dequantized weight: `Q8Head` has none
    biased = getattr(model.lm_head, "bias", None) is not None
    if head is not None and not biased and int8_kernel_fits(model.lm_head.weight):
        codes, scales = head
        install_q8_head(model, codes, group_scales(scales, codes.shape[1]), dtype, "per channel")
    if swapped:
        logger.info("weights int8: %d linear layers", swapped)
    return swapped
