"""Build (once per machine) and load a C++ kernel of `csrc/`, which registers its ops as
`torch.ops.inferos.*` when loaded.

Built the first time a process asks for it, with `CFLAGS` (-O3 -march=native ...), into a
directory keyed by CPU model and flags, torch and Python versions and the flags, so every
later process of the machine, whichever venv or checkout it runs from, loads the cached
`.so` (a file lock keeps concurrent builds from clashing; a changed source gets a new
directory). A
machine that cannot build logs one warning and callers keep their torch path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import platform
import threading
from pathlib import Path

import torch

from serving.env import inferos_home

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -fno-trapping-math: lets GCC turn float compares and selects into vector code (with the
# default, a loop holding `x < c ? c : x` stays scalar); no result changes, FP exceptions
# are never inspected.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-fno-trapping-math"]

_lock = threading.Lock()
_loaded: dict[str, bool] = {}


def _cpu_signature() -> str:
    """Model name and feature flags: a `-march=native` build runs only where they match."""
    name = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}|{flags}"


def build_directory(name: str) -> Path:
    """Keyed by what the library's machine code depends on: the CPU, torch's version and
    C++ ABI, Python's version, the flags and the source's text. Not by where torch or the
    source lie, so the venvs of one checkout (the vLLM hand-over runs under .venv-vllm, with
    the same torch) and two checkouts sharing `$INFEROS_HOME` (a CI clone beside a working
    tree) share one build: each used to compile all six kernels again (~100 s on 2 cores)."""
    source = CSRC / f"{name}.cpp"
    key = "|".join(
        [
            _cpu_signature(),
            torch.__version__,
            str(torch._C._GLIBCXX_USE_CXX11_ABI),
            platform.python_version(),
            " ".join(CFLAGS),
            hashlib.sha256(source.read_bytes()).hexdigest(),
        ]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return inferos_home() / "torch_extensions" / f"{name}-{digest}"


def library_path(name: str, directory: Path | None = None) -> Path:
    """The `.so` that `cpp_extension.load` leaves in the build directory (`directory`,
    where the caller has it already: working it out hashes the source again)."""
    return (directory or build_directory(name)) / f"inferos_{name}.so"


def _build(name: str) -> None:
    from torch.utils import cpp_extension

    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    # torch's own build lock is a file that a killed build (Ctrl-C, SIGTERM of a replica
    # mid-start) leaves behind, and every later build then waits on it forever; an OS lock
    # dies with its process, and whoever holds it may remove a stale torch lock. Held while
    # loading too, so nobody loads a library another process is still linking.
    with (directory / "inferos.flock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        library = library_path(name, directory)
        if library.exists():
            # built already, maybe by another venv or checkout: load it as it is, because
            # ninja would rebuild it for a command with other include or source paths
            torch.ops.load_library(str(library))
            return
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=f"inferos_{name}",
            sources=[str(CSRC / f"{name}.cpp")],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,  # the library registers torch.ops.inferos.* when loaded
            verbose=False,
        )


def load_kernel(name: str, op: str) -> bool:
    """Whether `torch.ops.inferos.<op>` (from `csrc/<name>.cpp`) can run here, building it
    on the first call; False, with one warning logged, where the build fails."""
    if name not in _loaded:
        with _lock:
            if name not in _loaded:
                try:
                    _build(name)
                    getattr(torch.ops.inferos, op)  # registered?
                    _loaded[name] = True
                except Exception as e:  # a missing compiler, ninja or header: any build error
                    logger.warning("kernel %s unavailable, using the torch path: %s", name, e)
                    _loaded[name] = False
    return _loaded[name]
