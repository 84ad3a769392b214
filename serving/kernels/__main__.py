"""`python -m serving.kernels`: build every C++ kernel for this machine now (`make install`
does), so that no server's first decode step waits for a compiler."""

from __future__ import annotations

import sys
import time

from serving.kernels import fused_ops, paged_attention, q8_linear


def main() -> int:
    ok = True
    for name, available in (
        ("paged_attention", paged_attention.kernel_available),
        ("q8_linear", q8_linear.kernel_available),
        ("fused_ops", fused_ops.kernel_available),
    ):
        started = time.perf_counter()
        print(f"kernel {name}: loading (compiled on first use, once per machine) ...", flush=True)
        built = available()
        ok &= built
        state = "ready" if built else "FAILED (the torch path serves instead)"
        print(f"kernel {name}: {state} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
