"""ΔPPL of int8 split by where it is applied: the head only, the layers only (bf16 reference
from ppl.json). Same tokens and settings as `inferos eval ppl` above."""

import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from policies.kv_levels import BASELINE
from serving.env import wikitext_path
from serving.eval.ppl import EvalSettings, evaluate
from serving.models import weight_cache, weight_formats
from serving.models.hf_folder import resolve_model_path
from serving.models.loader import load_model

part = sys.argv[1]  # "head" or "layers"
torch.set_num_threads(1)
tmp = Path(tempfile.mkdtemp())
weight_cache.cache_dir = lambda: tmp  # never the shared cache: these are not real formats
real = weight_formats.quantize_tensors


def only(weights, fmt, group):
    keep = {k: v for k, v in weights.items() if (k == weight_formats.HEAD) == (part == "head")}
    return real(keep, fmt, group)


weight_formats.quantize_tensors = only
folder = resolve_model_path(None)
tok = AutoTokenizer.from_pretrained(folder)
ids = tok(wikitext_path().read_text())["input_ids"][:32768]
model = load_model(folder, torch.bfloat16, max_positions=2048, weights="int8")
r = evaluate(model, ids, [BASELINE], EvalSettings(2048, 0, 1.0, "none"))["baseline"]
print(json.dumps({"int8_applied_to": part, "ppl": r["ppl"], "num_tokens": r["num_tokens"]}))
