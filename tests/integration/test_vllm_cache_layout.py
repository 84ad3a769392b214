"""Our connector reads vLLM's CPU KV cache right for every kernel ISA, not only for the
one this CPU runs: random K/V written by vLLM's own cache-write op come back equal.

The layouts differ by ISA ("amx" packs 16-token tiles, "vec" stores keys transposed), and
which one vLLM uses depends on the CPU, so a machine without AMX must still catch a
connector that would scramble the KV on a machine with it, wherever vLLM's library for
this CPU has the "amx" kernel: its AVX-512-BF16 build has (and writes that layout on CPUs
without AMX tiles too); the AVX2 and AVX-512 builds it loads on older CPUs have no "amx"
at all, and the AVX-512-BF16 build cannot be loaded there (SIGILL), so on such a CPU the
"amx" layout cannot be checked and cannot be hit either. Runs in `.venv-vllm`
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
    built = {c["isa"] for c in cases if c["built"]}
    # every x86 build writes the vec layouts; the one loaded on AVX-512-BF16 CPUs also amx
    assert built >= {"vec", "vec16"}, cases
    if layout_check["avx512_bf16"]:
        assert "amx" in built, cases
    # the kernel vLLM runs on this CPU is always among the checked ones
    assert layout_check["machine_isa"] in built
    wrong = [c for c in cases if c["built"] and not (c["keys_equal"] and c["values_equal"])]
    assert not wrong, f"K/V read back differ from what vLLM wrote: {wrong}"
