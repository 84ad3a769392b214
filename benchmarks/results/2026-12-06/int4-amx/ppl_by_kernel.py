"""Perplexity of the default model (bf16, `weights: auto`) with every linear on the Q4_1 grid
run by one int4 kernel at every step: `amx` (activations rounded to int8 per group of 32),
`q4` (activations as given) or none (dense bf16), in chunks of 32 tokens (a decode batch's
row count), as `inferos eval ppl` scores it. Writes JSON to argv[1].

    .venv/bin/python benchmarks/results/2026-12-06/int4-amx/ppl_by_kernel.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from serving.eval.ppl import BASELINE, EvalSettings, evaluate
from serving.kernels import q4_amx
from serving.models.hf_folder import resolve_model_path
from serving.models.int4 import HybridInt4Linear
from serving.models.loader import load_model

TEXT = Path(__file__).resolve().parents[4] / "../shared/data/wikitext2-dev.txt"
TOKENS = 16384
CONTEXT = 1024
CHUNK = 32


def main(out: Path) -> None:
    torch.set_num_threads(2)
    folder = resolve_model_path("default")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 1 << 30
    ids = tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"][:TOKENS]
    results = {}
    amx_here = q4_amx.kernel_available()
    for kernel in ("dense", "q4", "amx"):
        started = time.monotonic()
        # `kernel_for` picks amx where it runs; hiding it makes the layers pack for q4
        q4_amx.kernel_available = (lambda: amx_here) if kernel == "amx" else (lambda: False)
        model = load_model(folder, torch.bfloat16, max_positions=CONTEXT, int4_max_tokens=CHUNK)
        layers = [m for m in model.modules() if isinstance(m, HybridInt4Linear)]
        assert kernel == "dense" or all(m.kernel == kernel for m in layers), kernel
        for layer in layers:
            layer.max_int4_tokens = 0 if kernel == "dense" else CHUNK
        got = evaluate(model, ids, [BASELINE], EvalSettings(CONTEXT, CHUNK))[BASELINE.name]
        results[kernel] = {"ppl": got["ppl"], "layers": len(layers)}
        print(kernel, results[kernel], f"{time.monotonic() - started:.0f} s", flush=True)
    base = results["dense"]["ppl"]
    for r in results.values():
        r["delta_vs_dense_bf16"] = r["ppl"] / base - 1
    out.write_text(json.dumps({"tokens": len(ids), "context": CONTEXT, "chunk": CHUNK,
                               "results": results}, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
