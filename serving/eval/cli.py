"""`inferos eval ppl`: streaming perplexity / KLD / KV bytes per token of staged-KV profiles."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from policies.kv_levels import PROFILES, Level, Profile

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    p.add_argument(
        "--profile",
        default="balanced",
        help=f"KV profile, or several separated by commas ({', '.join(PROFILES)})",
    )
    p.add_argument("--context", type=int, default=2048, help="tokens per evaluated sequence")
    p.add_argument(
        "--max-tokens", type=int, default=0, help="score only the first N tokens (0: all)"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="tokens fed per step, the cache restaged between steps (0: the largest that "
        "divides every unit size and window, which stages exactly as decode)",
    )
    p.add_argument(
        "--pressure",
        type=float,
        default=1.0,
        help="KV pool used fraction the policy sees (1.0 = budget exhausted, the worst case)",
    )
    p.add_argument(
        "--importance",
        choices=["none", "attention"],
        default="none",
        help="none: every unit average; attention: the attention mass each unit received",
    )
    p.add_argument("--model", help="local HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument(
        "--weights",
        default="auto",
        help="model.weights format(s), comma-separated (auto, bf16, int8, int4); int8/int4 "
        "are also compared with bf16 (dense) weights on the same tokens: weights_delta_ppl_pct",
    )
    p.add_argument(
        "--int4-group-size", type=int, choices=[32, 64, 128], default=None,
        help="inputs per int4 scale (default: model.int4_group_size's)",
    )  # fmt: skip
    p.add_argument(
        "--int4-calibration",
        type=Path,
        default=None,
        help="int4: quantize by GPTQ calibrated on this text (model.int4_calibration); keep it "
        "disjoint from --text",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch default; 1 avoids OpenMP spin-waits on a shared box)",
    )
    p.add_argument("--json", action="store_true", help="print the result(s) as JSON")
    p.add_argument("--out", type=Path, help="also write the JSON to this file")


def parse_profiles(spec: str) -> list[Profile]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown or not names:
        raise ValueError(f"unknown profile(s) {unknown}; choose from {sorted(PROFILES)}")
    return [PROFILES[n] for n in names]


REFERENCE_WEIGHTS = "bf16"  # what a quantized format's quality cost is measured against


def parse_weights(spec: str) -> list[str]:
    """The formats to evaluate, the dense reference first where a quantized one needs it."""
    from serving.models.weight_formats import QUANTIZED, WEIGHT_FORMATS

    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in WEIGHT_FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown weights {unknown}; choose from {list(WEIGHT_FORMATS)}")
    if any(n in QUANTIZED for n in names):  # the reference first: the others compare to it
        names = [REFERENCE_WEIGHTS, *(n for n in names if n != REFERENCE_WEIGHTS)]
    return names


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from serving.config import ModelSettings
    from serving.eval.ppl import EvalSettings, evaluate
    from serving.models.hf_folder import resolve_model_path
    from serving.models.loader import load_model, parse_dtype
    from serving.models.weight_formats import INT8_LAYERS, Int4Recipe

    try:
        profiles = parse_profiles(args.profile)
        formats = parse_weights(args.weights)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    group_size = args.int4_group_size or ModelSettings().int4_group_size
    if not args.text.is_file():
        print(f"error: no such file: {args.text}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    folder = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = sys.maxsize  # we window the text ourselves
    token_ids = tokenizer(args.text.read_text(encoding="utf-8"))["input_ids"]
    if args.max_tokens > 0:
        token_ids = token_ids[: args.max_tokens]
    settings = EvalSettings(args.context, args.chunk, args.pressure, args.importance)

    def progress(done: int, total: int, _tallies) -> None:
        logger.info("window %d/%d (%.0f s)", done, total, time.monotonic() - started)

    ordered: list[dict] = []
    reference: dict[str, float] = {}  # profile -> ppl with the reference weights
    for weights in formats:
        started = time.monotonic()
        # no int4/int8 kernel path (int4_max_tokens 0): every step here is a chunk of many
        # tokens, which the engine too runs dense, on the same (dequantized) weights
        model = load_model(
            folder,
            parse_dtype(args.dtype),
            max_positions=args.context,
            weights=weights,
            int4=Int4Recipe(group_size, args.int4_calibration),
        )
        try:
            results = evaluate(model, token_ids, profiles, settings, progress)
        except ValueError as e:  # too little text, bad chunk/context
            print(f"error: {e}", file=sys.stderr)
            return 2
        del model
        for p in profiles:
            r = results[p.name]
            r["model"] = folder.name
            r["text"] = str(args.text)
            r["seconds"] = round(time.monotonic() - started, 1)
            r["recipe"] = recipe_of(PROFILES[r["profile"]])
            r["weights"] = weights
            if weights == "int4":
                r["int4_group_size"] = group_size
                r["int4_method"] = "gptq" if args.int4_calibration else "round-to-nearest"
                r["int4_int8_layers"] = list(INT8_LAYERS)
                if args.int4_calibration:
                    r["int4_calibration"] = str(args.int4_calibration)
            if weights == REFERENCE_WEIGHTS:
                reference[p.name] = r["ppl"]
            elif p.name in reference:
                r["weights_reference"] = REFERENCE_WEIGHTS
                r["weights_reference_ppl"] = reference[p.name]
                r["weights_delta_ppl_pct"] = 100.0 * (r["ppl"] / reference[p.name] - 1.0)
            ordered.append(r)
    payload = ordered[0] if len(ordered) == 1 else ordered
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        for r in ordered:
            cost = r.get("weights_delta_ppl_pct")
            weights = f"{r['weights']:>4}" + (f" ({cost:+.3f} %)" if cost is not None else "")
            print(
                f"weights {weights}  "
                f"{r['profile']:>10}: ppl {r['ppl']:.4f} ({r['delta_ppl_pct']:+.3f} %)  "
                f"kld {r['kld']:.5f}  {r['kv_bytes_per_token']:.0f} B/token "
                f"({r['reduction_vs_fp16']:.2f}x vs fp16)"
            )
    return 0


def recipe_of(profile: Profile) -> dict:
    from serving.kv.quant import DEFAULT_VALUE_GROUP  # torch: not at parser build time

    return {
        "quant_group_tokens": profile.quant_group_tokens,
        "recent_window_tokens": profile.recent_window_tokens,
        "num_sink_tokens": profile.num_sink_tokens,
        "levels": sorted(lv.name for lv in profile.allowed_levels),
        "sink_level": profile.sink_level.name,
        "key_value_bits": {
            lv.name: profile.level_bits(lv)
            for lv in sorted(profile.allowed_levels)
            if lv in (Level.L1, Level.L2)
        },
        "value_group": {f"int{b}": DEFAULT_VALUE_GROUP[b] for b in (8, 4, 2)},
    }
