"""Summaries of the raw runs in this folder: decode.json and ppl.json."""

import json
from pathlib import Path

here = Path("benchmarks/results/2026-12-05/weights")
uptimes = {}
for line in (here / "raw/uptime.txt").read_text().splitlines():
    fmt, rnd, rest = line.split(" ", 2)
    uptimes[(fmt, rnd)] = rest.split("load average:")[1].strip()
decode = {
    "benchmark": "benchmarks/engine_steady.py --concurrency 1 8 --num-prompts 16 "
    "--input-len 128 --output-len 128 (2 threads, product defaults + model.weights)",
    "decode_tok_per_s": "concurrency * 1000 / ms per decode-only step",
    "formats": {},
}
for fmt in ("auto", "bf16", "int8", "int4"):
    runs = []
    for rnd in ("r1", "r2"):
        rec = json.loads((here / f"raw/decode-{fmt}-{rnd}.json").read_text())
        for r in rec["results"]:
            c = r["concurrency"]
            ms = r["steps"]["decode only"]["ms_per_step"]
            runs.append(
                {
                    "round": rnd,
                    "concurrency": c,
                    "output_tok_per_s": r["output_tok_per_s"],
                    "decode_ms_per_step": ms,
                    "decode_tok_per_s": round(c * 1000 / ms, 1),
                    "load_average_at_start": uptimes[(fmt, rnd)],
                }
            )
    by_c = {}
    for c in (1, 8):
        rs = [r for r in runs if r["concurrency"] == c]
        by_c[f"c={c}"] = {
            "decode_tok_per_s_mean": round(sum(r["decode_tok_per_s"] for r in rs) / len(rs), 1),
            "output_tok_per_s_mean": round(sum(r["output_tok_per_s"] for r in rs) / len(rs), 1),
        }
    decode["formats"][fmt] = {"summary": by_c, "runs": runs}
for c in ("c=1", "c=8"):
    ref = decode["formats"]["bf16"]["summary"][c]["decode_tok_per_s_mean"]
    for fmt in decode["formats"]:
        s = decode["formats"][fmt]["summary"][c]
        s["decode_vs_bf16"] = round(s["decode_tok_per_s_mean"] / ref, 2)
(here / "decode.json").write_text(json.dumps(decode, indent=1) + "\n")

main = json.loads((here / "ppl_raw_main.json").read_text())
g32 = json.loads((here / "ppl_raw_int4_g32.json").read_text())
rows = []
for r in [*main, g32[1]]:
    rows.append(
        {
            k: r.get(k)
            for k in (
                "weights",
                "int4_group_size",
                "ppl",
                "weights_reference_ppl",
                "weights_delta_ppl_pct",
                "num_tokens",
                "context",
                "chunk",
                "seconds",
            )
        }
    )
assert g32[0]["ppl"] == main[0]["ppl"]  # the same bf16 reference in both runs
ppl = {
    "text": main[0]["text"],
    "model": main[0]["model"],
    "dtype": "bfloat16",
    "max_tokens": 32768,
    "results": rows,
}
split = here / "ppl_int8_split.json"
if split.exists():
    ppl["int8_split"] = json.loads(split.read_text())
(here / "ppl.json").write_text(json.dumps(ppl, indent=1) + "\n")
for fmt, v in decode["formats"].items():
    print(fmt, v["summary"])
for r in rows:
    print(r["weights"], r["int4_group_size"], round(r["ppl"], 4), r["weights_delta_ppl_pct"])
