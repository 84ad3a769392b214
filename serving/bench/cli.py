"""`inferos bench`: streaming load against any OpenAI-compatible server.

Example, the same load against ours and vLLM:

    inferos bench --base-url http://127.0.0.1:8000 --concurrency 8 --num-prompts 64 \\
        --input-len 256 --output-len 128
    inferos bench --base-url http://127.0.0.1:8001 ...   # `vllm serve` on another port
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from serving.bench.client import ClientConfig, Endpoint, resolve_api_key, run_benchmark
from serving.bench.prompts import build_prompts, load_token_counter, read_source_text
from serving.bench.report import RunInfo, format_table, plot, summarize, summary_line, write_json

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default="http://127.0.0.1:8000",
        help="server root; /v1 is appended if missing (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model name to request (default: first id from GET /v1/models)",
    )
    parser.add_argument(
        "--api-key", default=None, help="API key (default: $OPENAI_API_KEY, else 'EMPTY')"
    )
    parser.add_argument(
        "--endpoint",
        choices=[e.value for e in Endpoint],
        default=Endpoint.COMPLETIONS.value,
        help="completions: raw prompt, exact input length; chat: the text as one "
        "user message (the chat template adds tokens) (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="max requests in flight (default: %(default)s)"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=64, help="total requests (default: %(default)s)"
    )
    parser.add_argument(
        "--input-len",
        type=int,
        default=128,
        help="prompt tokens per request (default: %(default)s)",
    )
    parser.add_argument(
        "--output-len", type=int, default=128, help="max_tokens per request (default: %(default)s)"
    )
    parser.add_argument(
        "--prompts-file",
        default=None,
        help="text file to cut prompts from (default: WikiText-2 dev)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or .gguf for exact input lengths (default: the "
        "default model's, else a whitespace estimate)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="picks where in the text the prompts start (default: %(default)s)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default: %(default)s)"
    )
    parser.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="don't send ignore_eos/min_tokens (e.g. for api.openai.com); "
        "requests may then stop before --output-len",
    )
    parser.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        help='more request fields as a JSON object, e.g. \'{"logprobs": 5}\'',
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=600.0,
        help="per-request timeout in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--output-json", default=None, help="results file (default: results/bench_<timestamp>.json)"
    )
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar / periodic progress lines"
    )
    parser.add_argument(
        "--multi-turn",
        action="store_true",
        help="chat sessions, each sending its next turn (whole history) after the previous "
        "answer; reports TTFT per turn",
    )
    parser.add_argument("--turns", type=int, default=4, help="multi-turn: turns per session")
    parser.add_argument("--sessions", type=int, default=4, help="multi-turn: concurrent sessions")
    parser.add_argument(
        "--cold-probe",
        action="store_true",
        help="multi-turn: afterwards, one fresh prompt per session as long as its last turn "
        "(nothing of it stored): the TTFT a warm turn is compared with",
    )
    parser.add_argument(
        "--turn-len", type=int, default=64, help="multi-turn: new user tokens per later turn"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="multi-turn: run the sessions (and cold probes) this many times, one round after "
        "the other with new texts; percentiles pool every round, and each round's cold/warm "
        "ratio is reported (one round's ratio swings with a noisy machine)",
    )


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def _validate(args: argparse.Namespace) -> str | None:
    for name in (
        "concurrency",
        "num_prompts",
        "input_len",
        "output_len",
        "turns",
        "sessions",
        "rounds",
    ):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    return None


def _print_config(args: argparse.Namespace, tokenizer: str) -> None:
    print(
        f"bench config: base_url={args.base_url} model={args.model or '(from /v1/models)'} "
        f"endpoint={args.endpoint} concurrency={args.concurrency} "
        f"num_prompts={args.num_prompts} input_len={args.input_len} "
        f"output_len={args.output_len} seed={args.seed} temperature={args.temperature} "
        f"ignore_eos={args.ignore_eos} tokenizer={tokenizer} "
        f"extra_body={json.dumps(args.extra_body)}",
        flush=True,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if at least one request succeeded, 1 if none did, 2 on bad input."""
    error = _validate(args)
    if error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    if args.multi_turn:
        from serving.bench.multi_turn import run as run_multi_turn

        return run_multi_turn(args)
    try:
        counter = load_token_counter(args.tokenizer)
        text = read_source_text(args.prompts_file)
        prompts = build_prompts(text, counter, args.num_prompts, args.input_len, args.seed)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"bench: cannot build prompts: {e}", file=sys.stderr)
        return 2
    _print_config(args, counter.name)
    config = ClientConfig(
        base_url=args.base_url,
        api_key=resolve_api_key(args.api_key),
        endpoint=Endpoint(args.endpoint),
        max_tokens=args.output_len,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout_s,
        extra_body=args.extra_body,
    )
    try:
        bench_run = asyncio.run(
            run_benchmark(
                config, prompts, args.concurrency, counter, args.model, not args.no_progress
            )
        )
    except Exception as e:  # e.g. server down while listing models: one clear line, no trace
        hint = "" if args.model else " (pass --model NAME if the server has no /v1/models)"
        print(f"bench: {args.base_url}: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1
    info = RunInfo(
        base_url=args.base_url,
        model=bench_run.model,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        tokenizer=counter.name,
        exact_input_len=counter.exact,
    )
    summary = summarize(bench_run, info)
    print(format_table(summary))
    json_path = Path(args.output_json or f"results/bench_{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(summary, json_path)
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
        if plot(bench_run, summary, png_path):
            print(f"wrote {png_path}")
    print(summary_line(summary), flush=True)
    return 0 if summary["completed"] > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inferos bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    # WARNING at the root: httpx logs one INFO line per request, which would bury the table.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving").setLevel(logging.INFO)
    return run(parser.parse_args(argv))
