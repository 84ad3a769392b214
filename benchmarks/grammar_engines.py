"""xgrammar vs llguidance on this CPU, with the default model's tokenizer (issue 15, item 4).

Both engines run behind the same `serving.structured` backend interface the sampler will
call, so what is timed is what serving would pay:

  (a) compile: cold (a fresh backend, nothing cached) and warm (a `GrammarCache` hit), each
      with the time to the first mask of a new matcher (llguidance computes lexer states
      lazily, so some of its compile cost moves there);
  (b) mask fill per token while walking a valid document (fill the bitmask, accept the
      document's next token), for batches of 1 and of 8 sequences (8 different grammars,
      one `fill_bitmasks` call per step), plus applying the [8, vocab] mask to logits;
  (c) correctness: every document token is in the mask, and seeded random walks over the
      allowed tokens end in text that parses and validates (`jsonschema`) / matches.

Specs: `--num-schemas` generated JSON schemas (nested objects, arrays, enums, bounded
numbers, patterns), json_object, a regex and a choice. The machine is shared: the two
engines are interleaved per spec (order alternating), every round repeats everything, and
the report gives medians and llguidance/xgrammar ratios, with the load average around each
phase.

    .venv/bin/python benchmarks/grammar_engines.py \
        --out-dir benchmarks/results/2026-12-05/grammar

Writes grammar_engines.json (every sample's summary), grammar_engines.md (the table) and
grammar_engines.png into --out-dir; progress goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.structured.backend import GrammarBackend, allocate_bitmask  # noqa: E402
from serving.structured.cache import GrammarCache  # noqa: E402
from serving.structured.logits_mask import apply_bitmask_inplace  # noqa: E402
from serving.structured.registry import make_grammar_backend  # noqa: E402
from serving.structured.sample_schemas import make_schemas  # noqa: E402
from serving.structured.spec import StructuredSpec  # noqa: E402
from serving.structured.walk import closing_token_ids, random_walk  # noqa: E402

ENGINES = ("xgrammar", "llguidance")
REGEX = r"[A-Z][a-z]{2,10} [0-9]{1,4}(, [A-Z][a-z]+)*"
CHOICE = ("positive", "negative", "neutral")


def log(msg: str) -> None:
    print(f"[grammar {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> float:
    return os.getloadavg()[0]


class Case:
    """One spec with a document it accepts and a check for a walk's text."""

    def __init__(self, name: str, spec: StructuredSpec, document: str,
                 check: Callable[[str], None]) -> None:
        self.name, self.spec, self.document, self.check = name, spec, document, check


def make_cases(num_schemas: int, seed: int) -> list[Case]:
    import jsonschema

    cases = []
    for i, (schema, instance) in enumerate(make_schemas(num_schemas, seed)):
        def check(text: str, schema: dict = schema) -> None:
            jsonschema.validate(json.loads(text), schema)
        cases.append(Case(f"schema{i:02d}", StructuredSpec.json_schema(schema),
                          json.dumps(instance), check))

    def is_object(text: str) -> None:
        assert isinstance(json.loads(text), dict), text

    def matches(text: str) -> None:
        assert re.fullmatch(REGEX, text), text

    def is_choice(text: str) -> None:
        assert text in CHOICE, text

    cases.append(Case("json_object", StructuredSpec.json_object(),
                      json.dumps(make_schemas(1, seed + 1)[0][1]), is_object))
    cases.append(Case("regex", StructuredSpec.regex(REGEX), "Paris 75, France", matches))
    cases.append(Case("choice", StructuredSpec.choice(CHOICE), "neutral", is_choice))
    return cases


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def allowed(bitmask_row: torch.Tensor, token: int) -> bool:
    return bool((int(bitmask_row[token >> 5]) >> (token & 31)) & 1)


def compile_case(backend: GrammarBackend, cache: GrammarCache, case: Case) -> dict:
    """(a): cold compile + first mask; then a cache hit + a new matcher's first mask."""
    bitmask = allocate_bitmask(1, backend.vocab_size)
    compiled, cold_s = timed(lambda: cache.get(case.spec))
    matcher, new_s = timed(lambda: backend.new_matcher(compiled))
    _, first_mask_s = timed(lambda: matcher.fill_bitmask(bitmask, 0))
    _, hit_s = timed(lambda: cache.get(case.spec))
    matcher2, new2_s = timed(lambda: cache.new_matcher(case.spec))
    _, first_mask2_s = timed(lambda: matcher2.fill_bitmask(bitmask, 0))
    return {
        "compile_cold_ms": cold_s * 1e3,
        "first_mask_cold_ms": (new_s + first_mask_s) * 1e3,
        "cache_hit_us": hit_s * 1e6,
        "warm_request_ms": (hit_s + new2_s + first_mask2_s) * 1e3,  # hit + matcher + mask
    }


def walk_document(backend: GrammarBackend, cache: GrammarCache, case: Case,
                  token_ids: list[int]) -> dict:
    """(b) batch 1 and (c) the document is accepted: fill, check, accept, per token."""
    matcher = cache.new_matcher(case.spec)
    bitmask = allocate_bitmask(1, backend.vocab_size)
    fill_s, accept_s, num_refused = [], [], 0
    for token in token_ids:
        _, dt = timed(lambda: backend.fill_bitmasks([matcher], [0], bitmask))
        fill_s.append(dt)
        num_refused += not allowed(bitmask[0], token)
        ok, dt = timed(lambda t=token: matcher.accept_token(t))
        accept_s.append(dt)
        num_refused += not ok
    return {
        "num_tokens": len(token_ids),
        "fill_us_median": statistics.median(fill_s) * 1e6,
        "fill_us_mean": statistics.fmean(fill_s) * 1e6,
        "accept_us_median": statistics.median(accept_s) * 1e6,
        "num_refused": num_refused,
        "terminated": matcher.is_terminated(),
    }


def walk_batch(backend: GrammarBackend, cache: GrammarCache, cases: list[Case],
               docs: list[list[int]], logits_vocab: int) -> dict:
    """(b) batch of len(cases): one `fill_bitmasks` per step over the unfinished sequences,
    then each accepts its document's next token; also times applying the mask to logits."""
    # two matcher sets walked in step: llguidance keeps a state's mask once computed, so
    # timing both fills on one set would hand the second a cached mask
    matchers = [cache.new_matcher(c.spec) for c in cases]
    twins = [cache.new_matcher(c.spec) for c in cases]
    bitmask = allocate_bitmask(len(cases), backend.vocab_size)
    logits = torch.randn(len(cases), logits_vocab)  # [batch, vocab]
    step_s, loop_s, apply_s, num_tokens, num_refused = [], [], [], 0, 0
    for step in range(max(len(d) for d in docs)):
        live = [i for i, d in enumerate(docs) if step < len(d)]
        rows = list(range(len(live)))
        batch_set, loop_set = [matchers[i] for i in live], [twins[i] for i in live]

        def batch_call(ms: list = batch_set, rows: list[int] = rows) -> None:
            native_batch_fill(backend, ms, rows, bitmask)

        def one_by_one(ms: list = loop_set) -> None:
            for row, m in enumerate(ms):
                m.fill_bitmask(bitmask, row)

        for fn, out in ((batch_call, step_s), (one_by_one, loop_s))[:: 1 if step % 2 else -1]:
            out.append(timed(fn)[1])
        if len(live) == len(cases):
            _, dt = timed(lambda rows=rows: apply_bitmask_inplace(logits, bitmask, rows))
            apply_s.append(dt)
        for row, i in enumerate(live):
            token = docs[i][step]
            num_refused += not allowed(bitmask[row], token)  # the twins' mask, filled last
            num_refused += not matchers[i].accept_token(token)
            num_refused += not twins[i].accept_token(token)
            num_tokens += 1
    return {
        "num_steps": len(step_s),
        "num_tokens": num_tokens,
        "step_us_median": statistics.median(step_s) * 1e6,
        "fill_us_per_token": sum(step_s) / num_tokens * 1e6,
        "loop_step_us_median": statistics.median(loop_s) * 1e6,
        "loop_us_per_token": sum(loop_s) / num_tokens * 1e6,
        "apply_us_median": statistics.median(apply_s) * 1e6 if apply_s else None,
        "num_refused": num_refused,
    }


_XGR_BATCH: dict[int, Any] = {}


def native_batch_fill(backend: GrammarBackend, matchers: list, rows: list[int],
                      bitmask: torch.Tensor) -> None:
    """The engine's own threaded batch fill (xgrammar's BatchGrammarMatcher, llguidance's
    LLExecutor), measured against filling one row at a time."""
    if backend.name == "xgrammar":
        import xgrammar as xgr

        batch = _XGR_BATCH.setdefault(2, xgr.BatchGrammarMatcher(max_threads=2))
        batch.batch_fill_next_token_bitmask([m._m for m in matchers], bitmask, rows)
    else:
        backend.fill_bitmasks(matchers, rows, bitmask)  # LLExecutor already


def random_walks(backend: GrammarBackend, cache: GrammarCache, case: Case, preferred: list[int],
                 tokenizer: Any, num_walks: int) -> dict:
    """(c): seeded walks over allowed tokens must terminate in valid text."""
    failures = []
    lengths = []
    t0 = time.perf_counter()
    for seed in range(num_walks):
        result = random_walk(cache.new_matcher(case.spec), backend.vocab_size,
                             random.Random(seed), preferred)
        lengths.append(len(result.token_ids))
        text = tokenizer.decode(result.token_ids)
        try:
            assert result.terminated, "no stop within the step budget"
            case.check(text)
        except Exception as e:  # noqa: BLE001 (any failure is a finding to report)
            failures.append(f"seed {seed}: {type(e).__name__}: {str(e)[:160]}")
    return {"num_walks": num_walks, "failures": failures, "mean_len": statistics.fmean(lengths),
            "seconds": time.perf_counter() - t0}


def engine_order(i: int) -> tuple[str, ...]:
    return ENGINES if i % 2 == 0 else ENGINES[::-1]


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from serving.models.pull import ensure_default_model

    # NOTE: torch on 2 threads took 4.9 ms to clone [8, 49152] floats on this loaded machine
    # (36 us on 1): the small sampler-side ops are timed on one thread.
    torch.set_num_threads(1)
    folder = ensure_default_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    logits_vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    stop_ids = [tokenizer.eos_token_id]
    cases = make_cases(args.num_schemas, args.seed)
    docs = [tokenizer.encode(c.document, add_special_tokens=False) + stop_ids for c in cases]
    preferred = closing_token_ids(tokenizer, stop_ids)
    log(f"tokenizer {folder} ({len(tokenizer)} tokens, logits vocab {logits_vocab}); "
        f"{len(cases)} specs, docs {min(map(len, docs))}..{max(map(len, docs))} tokens")

    samples: dict[str, dict[str, list]] = {e: {"compile": [], "walk1": [], "walk8": [],
                                                "init_s": [], "random": []} for e in ENGINES}
    loads: dict[str, list[float]] = {"compile": [], "walk1": [], "walk8": [], "random": []}
    for rnd in range(args.rounds):
        backends: dict[str, GrammarBackend] = {}
        caches: dict[str, GrammarCache] = {}
        for e in engine_order(rnd):
            backends[e], dt = timed(lambda e=e: make_grammar_backend(
                tokenizer, engine=e, vocab_size=logits_vocab, stop_token_ids=stop_ids,
                max_threads=args.threads))
            caches[e] = GrammarCache(backends[e])
            samples[e]["init_s"].append(dt)
        loads["compile"].append(load())
        for i, case in enumerate(cases):
            for e in engine_order(rnd + i):
                r = compile_case(backends[e], caches[e], case)
                samples[e]["compile"].append({"round": rnd, "case": case.name, **r})
        loads["walk1"].append(load())
        for i, case in enumerate(cases):
            for e in engine_order(rnd + i):
                r = walk_document(backends[e], caches[e], case, docs[i])
                samples[e]["walk1"].append({"round": rnd, "case": case.name, **r})
        loads["walk8"].append(load())
        for g in range(0, len(cases) - 7, 8):
            group = list(range(g, g + 8))
            for e in engine_order(rnd + g // 8):
                r = walk_batch(backends[e], caches[e], [cases[i] for i in group],
                               [docs[i] for i in group], logits_vocab)
                samples[e]["walk8"].append({"round": rnd, "group": g // 8, **r})
        if rnd == 0:  # correctness once: seeded, so later rounds would repeat it exactly
            loads["random"].append(load())
            for i, case in enumerate(cases):
                for e in engine_order(i):
                    r = random_walks(backends[e], caches[e], case, preferred, tokenizer,
                                     args.num_walks)
                    samples[e]["random"].append({"case": case.name, **r})
        log(f"round {rnd + 1}/{args.rounds} done, load {load():.2f}; "
            + "; ".join(f"{e}: {summarize_engine(samples[e])['fill_b1_us']:.0f} us/token b1"
                        for e in ENGINES))
    summary = {e: summarize_engine(samples[e]) for e in ENGINES}
    ratios = {k: summary["llguidance"][k] / summary["xgrammar"][k]
              for k in summary["xgrammar"] if isinstance(summary["xgrammar"][k], float)
              and summary["xgrammar"][k] > 0}
    return {
        "config": {**vars(args), "tokenizer": str(folder), "tokenizer_size": len(tokenizer),
                   "logits_vocab": logits_vocab, "cases": [c.name for c in cases],
                   "versions": versions(), "cpu_count": os.cpu_count()},
        "summary": summary,
        "ratios_llguidance_over_xgrammar": ratios,
        "load_avg_1m": {k: v for k, v in loads.items()},
        "samples": samples,
    }


def _median(rows: list[dict], key: str, where: Callable[[dict], bool] = lambda r: True) -> float:
    vals = [r[key] for r in rows if where(r) and r[key] is not None]
    return float(statistics.median(vals)) if vals else float("nan")


def _quantile(rows: list[dict], key: str, q: float) -> float:
    vals = sorted(r[key] for r in rows)
    return float(vals[min(len(vals) - 1, int(q * len(vals)))]) if vals else float("nan")


def summarize_engine(s: dict) -> dict:
    is_schema = lambda r: r["case"].startswith("schema")  # noqa: E731
    random_rows = s["random"]
    return {
        "init_s": _median([{"v": v} for v in s["init_s"]], "v") if s["init_s"] else float("nan"),
        "compile_cold_ms": _median(s["compile"], "compile_cold_ms", is_schema),
        "compile_cold_ms_p90": _quantile(s["compile"], "compile_cold_ms", 0.9),
        "compile_cold_ms_max": max((r["compile_cold_ms"] for r in s["compile"]), default=0.0),
        "first_mask_cold_ms": _median(s["compile"], "first_mask_cold_ms", is_schema),
        "cache_hit_us": _median(s["compile"], "cache_hit_us"),
        "warm_request_ms": _median(s["compile"], "warm_request_ms", is_schema),
        "compile_json_object_ms": _median(s["compile"], "compile_cold_ms",
                                          lambda r: r["case"] == "json_object"),
        "compile_regex_ms": _median(s["compile"], "compile_cold_ms",
                                    lambda r: r["case"] == "regex"),
        "compile_choice_ms": _median(s["compile"], "compile_cold_ms",
                                     lambda r: r["case"] == "choice"),
        "fill_b1_us": _median(s["walk1"], "fill_us_median"),
        "fill_b1_us_mean": _median(s["walk1"], "fill_us_mean"),
        "accept_us": _median(s["walk1"], "accept_us_median"),
        "fill_b8_step_us": _median(s["walk8"], "step_us_median"),
        "fill_b8_us_per_token": _median(s["walk8"], "fill_us_per_token"),
        "loop_b8_step_us": _median(s["walk8"], "loop_step_us_median"),
        "loop_b8_us_per_token": _median(s["walk8"], "loop_us_per_token"),
        "apply_b8_us": _median(s["walk8"], "apply_us_median"),
        "num_refused_document_tokens": sum(r["num_refused"] for r in s["walk1"] + s["walk8"]),
        "num_random_walks": sum(r["num_walks"] for r in random_rows),
        "num_random_walk_failures": sum(len(r["failures"]) for r in random_rows),
        "random_walks_s": sum(r["seconds"] for r in random_rows),
    }


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("xgrammar", "llguidance", "torch", "transformers")}


ROWS = (
    ("compile_cold_ms", "compile, cold (median of schemas), ms"),
    ("compile_cold_ms_p90", "compile, cold, p90 over all specs and rounds, ms"),
    ("compile_cold_ms_max", "compile, cold, slowest spec, ms"),
    ("first_mask_cold_ms", "new matcher + first mask after a cold compile, ms"),
    ("cache_hit_us", "GrammarCache hit, us"),
    ("warm_request_ms", "warm request: cache hit + new matcher + first mask, ms"),
    ("compile_json_object_ms", "compile json_object, ms"),
    ("compile_regex_ms", "compile regex, ms"),
    ("compile_choice_ms", "compile choice, ms"),
    ("fill_b1_us", "mask fill per token, batch 1 (median), us"),
    ("fill_b1_us_mean", "mask fill per token, batch 1 (mean), us"),
    ("accept_us", "accept one token, us"),
    ("fill_b8_step_us", "mask fill per step, batch 8, engine's batch call (median), us"),
    ("fill_b8_us_per_token", "mask fill per token, batch 8, engine's batch call (mean), us"),
    ("loop_b8_step_us", "mask fill per step, batch 8, one row at a time (median), us"),
    ("loop_b8_us_per_token", "mask fill per token, batch 8, one row at a time (mean), us"),
    ("apply_b8_us", "apply [8, vocab] mask to logits (ours, same code for both), us"),
    ("init_s", "backend init (tokenizer vocabulary), s"),
    ("num_refused_document_tokens", "valid-document tokens refused (must be 0)"),
    ("num_random_walk_failures", "random walks not valid (must be 0)"),
    ("num_random_walks", "random walks run"),
    ("random_walks_s", "time for all random walks, s"),
)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_markdown(result: dict, path: Path) -> None:
    s, r = result["summary"], result["ratios_llguidance_over_xgrammar"]
    cfg = result["config"]
    lines = [
        "# Grammar engines on this CPU: xgrammar vs llguidance",
        "",
        f"Tokenizer: SmolLM2 ({cfg['tokenizer_size']} tokens, logits vocab "
        f"{cfg['logits_vocab']}); {len(cfg['cases'])} specs ({cfg['num_schemas']} generated "
        f"JSON schemas + json_object + regex + choice); {cfg['rounds']} rounds, engines "
        f"interleaved per spec; {cfg['threads']} threads; versions {cfg['versions']}.",
        f"Load average (1 min) at each phase start: {result['load_avg_1m']} on "
        f"{cfg['cpu_count']} cores (the machine is shared).",
        "",
        "| measure | xgrammar | llguidance | llguidance / xgrammar |",
        "|---|---:|---:|---:|",
    ]
    for key, label in ROWS:
        ratio = f"{r[key]:.2f}" if key in r else ""
        lines.append(f"| {label} | {fmt(s['xgrammar'][key])} | {fmt(s['llguidance'][key])} "
                     f"| {ratio} |")
    failures = [f"{e} {row['case']}: {f}" for e in ENGINES for row in result["samples"][e]["random"]
                for f in row["failures"]]
    if failures:
        lines += ["", "Random-walk failures:", ""] + [f"- {f}" for f in failures]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("compile_cold_ms", "compile cold\n(ms)"),
            ("first_mask_cold_ms", "1st mask\ncold (ms)"),
            ("warm_request_ms", "warm request\n(ms)"), ("fill_b1_us", "fill/token\nb1 (us)"),
            ("fill_b1_us_mean", "fill/token\nb1 mean (us)"),
            ("fill_b8_step_us", "fill/step b8\nbatch call (us)"),
            ("loop_b8_step_us", "fill/step b8\nrow loop (us)"))
    s = result["summary"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for j, e in enumerate(ENGINES):
        vals = [s[e][k] for k, _ in keys]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(keys))], vals, width, label=e)
        ax.bar_label(bars, labels=[fmt(v) for v in vals], fontsize=7)
    ax.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
    ax.set_yscale("log")
    ax.set_title("Grammar engines, SmolLM2 tokenizer, medians (log scale; lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks/results/2026-12-05/grammar")
    p.add_argument("--num-schemas", type=int, default=24)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--num-walks", type=int, default=5, help="random walks per spec and engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    log(f"config: {vars(args)}")
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result["config"]["out_dir"] = str(result["config"]["out_dir"])
    (args.out_dir / "grammar_engines.json").write_text(json.dumps(result, indent=1, default=str))
    write_markdown(result, args.out_dir / "grammar_engines.md")
    write_plot(result, args.out_dir / "grammar_engines.png")
    s = result["summary"]
    log("summary: " + "; ".join(
        f"{e}: compile {s[e]['compile_cold_ms']:.1f} ms, fill b1 {s[e]['fill_b1_us']:.0f} us, "
        f"b8 {s[e]['loop_b8_us_per_token']:.0f} us/token, "
        f"failures {s[e]['num_random_walk_failures'] + s[e]['num_refused_document_tokens']}"
        for e in ENGINES))
    log(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
