"""`python -m serving.kernels`: build every C++ kernel for this machine now (`make install`
does), so that no server's first decode step waits for a compiler.

Each kernel compiles in its own process, all at once: one g++ is single-threaded, so on two
cores the six builds take less than half the time one after the other (the fresh-clone CI
pays this every run). `python -m serving.kernels NAME` builds one."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

from serving.kernels import fused_ops, greedy, paged_attention, q4_amx, q4_linear, q8_linear

KERNELS: dict[str, Callable[[], bool]] = {
    "paged_attention": paged_attention.kernel_available,
    "q8_linear": q8_linear.kernel_available,
    "q4_linear": q4_linear.kernel_available,
    "q4_amx": q4_amx.kernel_built,  # built everywhere; runs where the CPU has AMX or VNNI
    "fused_ops": fused_ops.kernel_available,
    "greedy": greedy.kernel_available,
}


def build_one(name: str) -> bool:
    started = time.perf_counter()
    built = KERNELS[name]()
    state = "ready" if built else "FAILED (the torch path serves instead)"
    print(f"kernel {name}: {state} in {time.perf_counter() - started:.1f} s", flush=True)
    return built


def main(argv: list[str]) -> int:
    if argv:
        return 0 if all(build_one(name) for name in argv) else 1
    print(f"kernels {', '.join(KERNELS)}: compiling (once per machine) ...", flush=True)
    children = [
        subprocess.Popen([sys.executable, "-m", "serving.kernels", name]) for name in KERNELS
    ]
    return 0 if all(child.wait() == 0 for child in children) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
