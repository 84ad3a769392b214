"""`inferos serve | bench | models pull | eval ppl` — the project's one command-line entry point."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from serving.config import InferosConfig
from serving.env import admin_token, api_key
from serving.stop_signal import stop_on_signal


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with InferosConfig fields")
    p.add_argument(
        "--model",
        help="local HF folder or llama.cpp .gguf file of a supported model (default: "
        "SmolLM2-135M-Instruct); a GGUF is converted into the model cache on first use",
    )
    p.add_argument("--served-model-name")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--prefill-replicas", type=int)
    p.add_argument("--decode-replicas", type=int)
    p.add_argument(
        "--api-key",
        nargs="+",
        help="require one of these keys as 'Authorization: Bearer KEY' (default: "
        "$INFEROS_API_KEY; /health, /metrics and the console page stay open)",
    )
    p.add_argument(
        "--admin-token", help="token for the control API (default: $INFEROS_ADMIN_TOKEN)"
    )
    p.add_argument(
        "--telemetry-dir", help="write live metrics as JSON lines every second to this folder"
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        help="engine steps per streamed chunk (default: by load, 1 for a few streams, "
        "up to 8 at 32 and more)",
    )
    p.add_argument(
        "--pd-mode",
        choices=["disaggregated", "colocated", "auto"],
        help="disaggregated (default): prefill replicas hand KV to decode through the store; "
        "colocated: decode replicas prefill too; auto: per request",
    )
    p.add_argument(
        "--kv-profile",
        choices=["baseline", "safe", "balanced", "aggressive"],
        help="staged-KV profile at start (default baseline; changeable via POST /v1/policy)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each replica's planned memory (weights, KV pool, workspace) and the KV "
        "store's budget against this machine's; exit 2 if it cannot fit; start nothing",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tool_choice auto (the default with tools): read tool calls out of the "
        "model's text with --tool-call-parser (default on; --no-enable-auto-tool-choice: "
        "such requests get a 400, as vLLM without the flag)",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=["hermes", "json"],
        help="format of the model's tool calls under tool_choice auto (default hermes)",
    )
    p.add_argument(
        "--no-prefix-reuse",
        dest="prefix_reuse",
        action="store_false",
        default=None,
        help="prefill every prompt in full, even where its prefix's KV is stored",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as vLLM's: keep finished requests' full KV blocks in the engine's pool for "
        "prompts that start the same way (default on)",
    )


def build_config(args: argparse.Namespace) -> InferosConfig:
    cfg = InferosConfig.from_yaml(args.config) if args.config else InferosConfig()
    data = cfg.model_dump()
    overrides = {
        # a GGUF's absolute path: Ray workers do not share the driver's working directory
        ("model", "path"): args.model
        and (str(Path(args.model).resolve()) if args.model.endswith(".gguf") else args.model),
        ("model", "served_model_name"): args.served_model_name,
        ("model", "dtype"): args.dtype,
        ("model", "max_model_len"): args.max_model_len,
        ("server", "host"): args.host,
        ("server", "port"): args.port,
        ("server", "api_key"): args.api_key or api_key(),
        ("server", "admin_token"): args.admin_token or admin_token(),
        # an absolute path: Ray workers do not share the driver's working directory
        ("server", "telemetry_dir"): args.telemetry_dir and str(Path(args.telemetry_dir).resolve()),
        ("prefill", "num_replicas"): args.prefill_replicas,
        ("decode", "num_replicas"): args.decode_replicas,
        ("scheduling", "stream_interval"): args.stream_interval,
        ("scheduling", "pd_mode"): args.pd_mode,
        ("kv_cache", "profile"): args.kv_profile,
        ("kv_cache", "prefix_reuse"): args.prefix_reuse,
        ("kv_cache", "enable_prefix_caching"): args.enable_prefix_caching,
        ("tool_calling", "enable_auto_tool_choice"): args.enable_auto_tool_choice,
        ("tool_calling", "tool_call_parser"): args.tool_call_parser,
    }
    for (section, key), value in overrides.items():
        if value is not None:
            data[section][key] = value
    return InferosConfig.model_validate(data)


def cmd_serve(args: argparse.Namespace) -> int:
    config = build_config(args)
    from serving.models.hf_folder import resolve_model_path

    try:  # before anything starts: a missing or unsupported model is the user's to fix
        resolve_model_path(config.model.path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"inferos serve: {exc}", file=sys.stderr)
        return 1
    if args.dry_run:
        return dry_run(config)
    from deployments.launch import run_app, shutdown

    print(f"starting Infer-OS Serve ({config.model.path or 'default model'}) ...", flush=True)
    try:
        with stop_on_signal():  # from here on, SIGTERM/SIGINT end the `with`, even mid-start
            url = run_app(config)
            print(
                f"\nInfer-OS Serve is ready: {url}/v1  (OpenAI API; "
                f"health: {url}/health, metrics: {url}/metrics)\n",
                flush=True,
            )
            while True:
                time.sleep(3600)
    finally:
        print("shutting down ...", flush=True)
        shutdown()
    return 0


def dry_run(config: InferosConfig) -> int:
    """Print what each replica would hold; exit 2 if it cannot fit here (nothing started)."""
    from serving.models.hf_folder import resolve_model_path
    from serving.plan import make_plan

    plan = make_plan(config, resolve_model_path(config.model.path))
    print(plan.table())
    refusal = plan.refusal()
    if refusal is not None:
        print(f"refused: {refusal}", file=sys.stderr)
        return 2
    print("fits: `inferos serve` without --dry-run starts it")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from serving.models.pull import run_pull

    return run_pull(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from serving.bench.cli import run

    logging.getLogger("httpx").setLevel(logging.WARNING)
    return run(args)


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    from serving.eval.cli import run

    logging.getLogger("transformers").setLevel(logging.ERROR)
    return run(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from serving.chat_cli import run

    logging.getLogger().setLevel(logging.WARNING)  # the terminal is the chat's
    return run(args)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferos", description="Infer-OS Serve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="serve a model with the OpenAI-compatible API")
    _serve_args(serve_p)
    serve_p.set_defaults(func=cmd_serve)

    from serving.bench.cli import add_arguments

    bench_p = sub.add_parser("bench", help="load-test any OpenAI-compatible endpoint")
    add_arguments(bench_p)
    bench_p.set_defaults(func=cmd_bench)

    from serving.chat_cli import add_arguments as add_chat_arguments

    chat_p = sub.add_parser("chat", help="chat with a running server in the terminal")
    add_chat_arguments(chat_p)
    chat_p.set_defaults(func=cmd_chat)

    models_p = sub.add_parser("models", help="manage local models")
    models_sub = models_p.add_subparsers(dest="models_command", required=True)
    pull_p = models_sub.add_parser("pull", help="install and convert the default model (offline)")
    pull_p.add_argument("--force", action="store_true", help="convert again even if present")
    pull_p.set_defaults(func=cmd_models_pull)

    from serving.eval.cli import add_arguments as add_eval_arguments

    eval_p = sub.add_parser("eval", help="measure model quality")
    eval_sub = eval_p.add_subparsers(dest="eval_command", required=True)
    ppl_p = eval_sub.add_parser(
        "ppl", help="streaming perplexity, KLD and KV bytes/token of staged-KV profiles"
    )
    add_eval_arguments(ppl_p)
    ppl_p.set_defaults(func=cmd_eval_ppl)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
