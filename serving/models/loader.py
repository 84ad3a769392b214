"""Load a local Hugging Face folder into the model class of its family (`families.py`):
safetensors, or PyTorch `.bin` files where a folder has no safetensors (read with
`weights_only=True`: tensors only, no pickled code runs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from serving.models.causal_lm import CausalLM
from serving.models.dense_kernels import use_measured_dense
from serving.models.families import family_for
from serving.models.int4 import repack_int4, use_measured_int4
from serving.models.q8_head import use_q8_head
from serving.models.weight_formats import (
    QUANTIZED,
    WEIGHT_FORMATS,
    Int4Recipe,
    WeightFormat,
    dequantized_source,
    install_int4,
    install_int8,
    quantize_model_weights,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} not supported; choose one of {sorted(_DTYPES)}") from None


def _weight_files(folder: Path, index_name: str, pattern: str) -> list[str]:
    index = folder / index_name
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in sorted(folder.glob(pattern))]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:  # zip-format files (torch >= 1.6) map instead of reading the whole file
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    files = _weight_files(folder, "model.safetensors.index.json", "*.safetensors")
    if files:
        for name in files:
            state.update(load_file(str(folder / name)))
        return state
    files = _weight_files(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    for name in files:
        state.update(_load_bin(folder / name))
    return state


def load_model(
    folder: Path,
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    int4_max_tokens: int = 0,
    measured_dense: bool = False,
    weights: WeightFormat = "auto",
    int4: Int4Recipe = Int4Recipe(),
) -> CausalLM:
    """`int4_max_tokens > 0`: steps of up to that many tokens run on a lossless 4-bit
    repack (bf16 activations) of the linear layers whose weights came from a 4-bit GGUF,
    and an LM head that came from a Q8_0 tensor samples few rows from its int8 codes
    (`q8_head`, exact weights, fp32 sums).
    `measured_dense`: plain linear layers switch between bf16 and fp32 at the batch size
    from which this machine runs fp32 faster (`dense_kernels`, measured once per machine).
    Neither (the default) keeps `dtype` everywhere: the reference numerics.
    `weights` (`weight_formats`): auto = the above; bf16 = dense only, no int4 or int8 path
    whatever `int4_max_tokens`; int8 / int4 = the linear weights quantized (cached on disk),
    the model computing with their dequantized values, and steps of up to
    `int4_max_tokens` tokens on the int8 / int4 kernels; `int4` says how int4 quantizes
    (group, GPTQ calibration text or round-to-nearest, layers kept int8)."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights {weights!r} not supported; choose one of {WEIGHT_FORMATS}")
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    family = family_for(config)
    arch = family.arch_from_config(config)
    with torch.device("meta"):
        model = family.model_cls(arch, max_positions=max_positions)
    source = family.state_dict(_read_state_dict(folder), arch)
    quantized = None
    if weights in QUANTIZED:
        quantized = quantize_model_weights(folder, model, source, weights, int4)
        source = dequantized_source(source, quantized)
    # the GGUF-grid repack and Q8_0 head only for `auto`; `bf16` is dense, int8/int4 below
    grid_kernels = int4_max_tokens if weights == "auto" else 0
    quantized_kernels = int4_max_tokens if quantized is not None else 0
    state = {k: v.to(dtype) for k, v in source.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers were created on the meta device; rebuild them for real.
    cos, sin = model.rope_tables(arch, max_positions or arch.max_position_embeddings)
    model.rope_cos, model.rope_sin = cos, sin
    if grid_kernels > 0 and dtype in (torch.bfloat16, torch.float32):
        repack_int4(model, source, grid_kernels)
    if quantized is not None:
        install_int4(model, quantized, quantized_kernels)
    if arch.tie_word_embeddings:  # the head as loaded: the embedding
        source["lm_head.weight"] = source["embed_tokens.weight"]
    if measured_dense:
        use_measured_dense(model, source)
    if int4_max_tokens > 0 and measured_dense and weights != "bf16":
        use_measured_int4(model, dtype, int4_max_tokens)
    if quantized is not None:
        install_int8(model, quantized, quantized_kernels, dtype, measured_dense)
    elif grid_kernels > 0 and "lm_head.weight" in source:
        use_q8_head(model, source["lm_head.weight"], dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"weights missing from {folder}: {missing[:5]}")
    logger.info(
        "loaded %s (%s, %d layers, %s, weights %s)",
        folder.name,
        family.name,
        arch.num_layers,
        dtype,
        weights,
    )
    return model.eval()
