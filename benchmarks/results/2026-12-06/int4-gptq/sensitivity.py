"""One-off: the ppl cost of round-to-nearest int4 off the GGUF grid (groups of 32 shifted by
16 inputs, as `offset_gptq_model.py`) on the layers matching each PATTERN alone.

usage (from the checkout): .venv/bin/python sensitivity.py PATTERN [PATTERN ...]
"""

import re
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from policies.kv_levels import PROFILES
from serving.eval.ppl import EvalSettings, evaluate
from serving.models.hf_folder import resolve_model_path
from serving.models.loader import load_model
from serving.models.weight_quant import dequantize_int4, quantize_int4_groups

REFERENCE_PPL = 20.70962  # bf16, same tokens (ppl_offset16_none.json)
torch.set_num_threads(2)
src = resolve_model_path(None)
tokenizer = AutoTokenizer.from_pretrained(src)
tokenizer.model_max_length = 1 << 30
ids = tokenizer(Path("../shared/data/wikitext2-dev.txt").read_text())["input_ids"][:32768]
for pattern in sys.argv[1:]:
    model = load_model(src, torch.bfloat16, max_positions=2048, weights="bf16")
    count = 0
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and name.startswith("layers.") and re.search(pattern, name):
            rolled = torch.roll(m.weight.data.float(), -16, dims=1)
            deq = torch.roll(dequantize_int4(*quantize_int4_groups(rolled, 32)), 16, dims=1)
            m.weight.data.copy_(deq.to(torch.bfloat16))
            count += 1
    settings = EvalSettings(2048, 0, 1.0, "none")
    ppl = evaluate(model, ids, [PROFILES["baseline"]], settings)["baseline"]["ppl"]
    print(pattern, count, round(ppl, 4), f"{100 * (ppl / REFERENCE_PPL - 1):+.2f}%", flush=True)
