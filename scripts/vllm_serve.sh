#!/usr/bin/env bash
# Serve the default model with vLLM (CPU) from .venv-vllm, in the foreground: the baseline
# that benchmarks/compare_vllm.py measures beside our server. Ctrl-C (SIGINT/SIGTERM) stops it.
#
# Env:  PORT (8100), HOST (127.0.0.1), MODEL_DIR (default: $INFEROS_HOME/models/SmolLM2-135M-Instruct,
#       as serving.env.default_model_dir()), SERVED_MODEL_NAME (SmolLM2-135M-Instruct),
#       VLLM_VENV (<repo>/.venv-vllm), and any VLLM_* variable to override the defaults below.
# Extra arguments are passed on to `vllm serve`, after ours (so they win), e.g.
#   scripts/vllm_serve.sh --max-num-seqs 64
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
INFEROS_HOME="${INFEROS_HOME:-$HOME/.cache/inferos}"
MODEL_DIR="${MODEL_DIR:-$INFEROS_HOME/models/SmolLM2-135M-Instruct}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-SmolLM2-135M-Instruct}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8100}"

if [ ! -x "$VENV/bin/vllm" ]; then
    echo "vllm_serve: $VENV/bin/vllm not found; run scripts/setup_vllm.sh (make vllm-setup) first" >&2
    exit 1
fi
if [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "vllm_serve: no HF model folder at $MODEL_DIR (set MODEL_DIR or INFEROS_HOME)" >&2
    exit 1
fi

# CPU backend settings that measured best on the 2-core dev machine:
# - bind OpenMP to both cores (vLLM's default "auto" binds one core of the box);
# - 1 GiB of KV cache, plenty for a 135M model at 2048 tokens x dozens of sequences.
export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
# vLLM 0.32's AOT compile cache fails to load back with torch 2.13 ("'function' object has
# no attribute 'finalize_loading'"), so with it every start recompiles (~55 s of a ~90 s start).
# The plain torch.compile cache does hit: ~12 s engine init once ~/.cache/vllm is warm.
export VLLM_USE_AOT_COMPILE="${VLLM_USE_AOT_COMPILE:-0}"
# No network here but package registries: never reach for the Hub or send usage stats.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

echo "vllm_serve: $MODEL_DIR as $SERVED_MODEL_NAME on http://$HOST:$PORT" \
     "(VLLM_CPU_OMP_THREADS_BIND=$VLLM_CPU_OMP_THREADS_BIND VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE)" >&2

# exec: the caller's PID is vLLM's, so a plain kill/Ctrl-C reaches it. Request logging is
# off by default in this version (it has --enable-log-requests, not --disable-log-requests);
# the per-request uvicorn access log is turned off too, so it does not cost the benchmark.
exec "$VENV/bin/vllm" serve "$MODEL_DIR" \
    --served-model-name "$SERVED_MODEL_NAME" \
    --host "$HOST" --port "$PORT" \
    --dtype bfloat16 \
    --stream-interval 8 \
    --max-model-len 2048 \
    --disable-uvicorn-access-log \
    "$@"
