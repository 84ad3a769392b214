"""Our connector reads vLLM's CPU KV cache right for every kernel ISA, not only for the
one this CPU runs: random K/V written by vLLM's own cache-write op come back equal.

The layouts differ by ISA ("amx" packs 16-token tiles, "vec" stores keys transposed), and
which one vLLM uses depends on the CPU, so a machine without AMX must still catch a
connector that would scramble the KV on a machine with it. Runs in `.venv-vllm`
(tests/integration/vllm_cache_layout_check.py); skipped when that venv is absent.
"""

from __future__ import annotations

import platform

import pytest

from tests.integration.vllm_venv import ROOT, needs_vllm, run_in_vllm_venv

pytestmark = pytest.mark.integration

X86_ISAS = {"vec", "vec16", "amx"}


@pytest.fixture(scope="module")
def layout_check() -> dict:
    return run_in_vllm_venv([str(ROOT / "tests" / "integration" / "vllm_cache_layout_check.py")])


@needs_vllm
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISAs only")
def test_connector_reads_every_x86_cpu_attention_layout(layout_check) -> None:
    cases = layout_check["cases"]
    assert {c["isa"] for c in cases} == X86_ISAS
    assert layout_check["machine_isa"] in X86_ISAS
    wrong = [c for c in cases if not (c["keys_equal"] and c["values_equal"])]
    assert not wrong, f"K/V read back differ from what vLLM wrote: {wrong}"
