"""Perplexity of the default model with its linear layers int4-quantized off the GGUF grid,
by GPTQ or by round-to-nearest: the product's quantizers, evaluated as `inferos eval ppl`
does (bf16, baseline KV profile, context 2048, 128-token chunks, the first 32,768 tokens of
the WikiText-2 file).

As `../../2026-12-05/weights/offset_int4_model.py` does for round-to-nearest: the default
model's fp32 weights are dequantized Q4_1 (groups of 32 inputs), so groups of 32 land back
on that grid; here every row is rolled by -OFFSET inputs (and its Hessian's rows and
columns with it) before quantizing (`serving.models.gptq.gptq_int4`, group 32, sequential
over the layers: `serving.models.calibration.quantize_sequentially`) and back after, so
with OFFSET 16 each group spans halves of two Q4_1 blocks. Calibration: the product's
windows (64 x 512 tokens) of CALIB, a text disjoint from the evaluated tokens (the second
half of the file by characters). The head stays bf16 (int4's int8 head costs +0.1 %).

usage: .venv/bin/python offset_gptq_model.py OUT.json OFFSET CALIB gptq|gptq-act|rtn|none [INT8]
(`none`: the dense bf16 reference on the same tokens; `gptq-act`: GPTQ in act order; INT8:
a regular expression of layer keys kept int8 per channel instead, the mixed precision of
llama.cpp's 4-bit mixes)
"""

import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from policies.kv_levels import PROFILES
from serving.eval.ppl import EvalSettings, evaluate
from serving.models.calibration import (
    NUM_WINDOWS,
    WINDOW,
    calibration_windows,
    quantize_sequentially,
)
from serving.models.gptq import gptq_int4
from serving.models.hf_folder import resolve_model_path
from serving.models.loader import load_model
from serving.models.weight_quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4_groups,
    quantize_int8_per_channel,
)

GROUP = 32
TEXT = Path(__file__).parents[4] / "../shared/data/wikitext2-dev.txt"
out, offset, calib, mode = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
# CALIB_WINDOW=2048: 16 windows of 2048 tokens instead of the product's 64 x 512
window = int(os.environ.get("CALIB_WINDOW", WINDOW))
keep_int8 = re.compile(sys.argv[5]) if len(sys.argv) > 5 else None
torch.set_num_threads(2)
src = resolve_model_path(None)
err2, norm2 = 0.0, 0.0
quantized: dict[str, torch.Tensor] = {}


def quantize(key: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    global err2, norm2
    rolled = torch.roll(w, -offset, dims=1)
    if keep_int8 is not None and keep_int8.search(key):
        deq = dequantize_int8(*quantize_int8_per_channel(w))
        err2 += float((deq - w).pow(2).sum())
        norm2 += float(w.pow(2).sum())
        quantized[key] = deq
        return deq
    if mode == "rtn":
        q, sz = quantize_int4_groups(rolled, GROUP)
    else:
        perm = torch.roll(torch.arange(w.shape[1]), -offset)
        q, sz = gptq_int4(rolled, h[perm][:, perm], GROUP, act_order=mode == "gptq-act")
    deq = torch.roll(dequantize_int4(q, sz), offset, dims=1)
    err2 += float((deq - w).pow(2).sum())
    norm2 += float(w.pow(2).sum())
    quantized[key] = deq
    return deq


started = time.monotonic()
if mode != "none":
    fp32 = load_model(src, torch.float32, max_positions=2048, weights="bf16")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.model_max_length = 1 << 30
    calib_ids = tokenizer(calib.read_text(encoding="utf-8"))["input_ids"]
    windows = calibration_windows(calib_ids, window, NUM_WINDOWS * WINDOW // window)
    quantize_sequentially(fp32, windows, quantize)
    del fp32
quant_s = time.monotonic() - started
model = load_model(src, torch.bfloat16, max_positions=2048, weights="bf16")
params = dict(model.named_parameters())
for key, deq in quantized.items():
    params[f"{key}.weight"].data.copy_(deq.to(torch.bfloat16))
tokenizer = AutoTokenizer.from_pretrained(src)
tokenizer.model_max_length = 1 << 30
ids = tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"][:32768]
result = evaluate(model, ids, [PROFILES["baseline"]], EvalSettings(2048, 0, 1.0, "none"))
r = result["baseline"]
summary = {
    "mode": mode,
    "int8_layers": sys.argv[5] if keep_int8 is not None else None,
    "offset": offset,
    "group": GROUP,
    "layers": len(quantized),
    "relative_rms_weight_error": (err2 / norm2) ** 0.5 if norm2 else 0.0,
    "ppl": r["ppl"],
    "num_tokens": r["num_tokens"],
    "quantize_seconds": round(quant_s, 1),
    "seconds": round(time.monotonic() - started, 1),
    "calibration": str(calib),
    "calibration_windows": f"{NUM_WINDOWS * WINDOW // window} x {window}",
}
out.write_text(json.dumps(summary, indent=1))
print(summary)
