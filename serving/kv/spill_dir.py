"""The kv_store's own spill directory: created per process, removed when the store closes.

Its name says whose it is, `inferos-store-<pid>-<host tag>-<random>`, so a store starting
on the same machine removes what a killed one left behind (`ray.kill` and SIGKILL run no
clean-up): a directory whose pid is no longer alive on this host is stale. The host tag
keeps a store from judging another machine's pids when `spill_dir` is a shared mount.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import weakref
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "inferos-store-"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(root: Path) -> list[Path]:
    """Remove the spill directories under `root` of dead store processes on this host."""
    removed: list[Path] = []
    tag = _host_tag()
    for path in root.glob(f"{PREFIX}*"):
        pid, _, rest = path.name[len(PREFIX) :].partition("-")
        if not (path.is_dir() and pid.isdigit() and rest.startswith(f"{tag}-")):
            continue  # not one of ours (or another host's): leave it
        if int(pid) == os.getpid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        logger.info("kv_store: removed %d stale spill directories under %s", len(removed), root)
    return removed


class SpillDirectory:
    """A fresh directory under `parent` (None: the system temp directory), removed by
    `close()`, or when this object is collected or the interpreter exits."""

    def __init__(self, parent: Path | None = None) -> None:
        root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        prefix = f"{PREFIX}{os.getpid()}-{_host_tag()}-"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        # finalize, not __del__: it also runs at interpreter exit, and only once
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def close(self) -> None:
        """Remove the directory and everything in it (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive
