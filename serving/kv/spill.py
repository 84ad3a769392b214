"""The spill tier (level L3): whole tensors on local disk, returned bit-identical.

Demotion to L1/L2 is lossy; keeping the original block here is what makes promotion back to
L0 reversible. Files are safetensors (no pickle, so a spill directory can't execute code,
and bf16 is stored as raw bits). A file's name is a hash of its key, so any key string is
safe and a new store opened on the same directory finds what an earlier one wrote.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SUFFIX = ".safetensors"
_TENSOR_NAME = "block"

# (named tensors, file path) -> None: safetensors' `save_file`; tests inject one that fails
# as a full disk does (OSError ENOSPC).
Writer = Callable[[dict[str, torch.Tensor], str], None]


class SpillStore:
    """Key -> tensor on disk. Not thread-safe; one owner (the engine's KV manager) per directory."""

    def __init__(self, directory: Path, writer: Writer = save_file) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = writer

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return self.directory / f"{digest}{_SUFFIX}"

    def put(self, key: str, tensor: torch.Tensor) -> int:
        """Write `tensor` under `key` (replacing any previous one); returns the file's bytes.

        Written to a temporary name then renamed, so a crash never leaves a torn block that
        `get` would load as garbage.
        """
        return self.put_tensors(key, {_TENSOR_NAME: tensor})

    def put_tensors(self, key: str, tensors: dict[str, torch.Tensor]) -> int:
        """Several named tensors in one file (one spilled sequence); returns its bytes."""
        path = self._path(key)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self._writer(
                {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, str(tmp)
            )
        except BaseException:  # a full disk leaves a partial file: don't count or keep it
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path.stat().st_size

    def get_tensors(self, key: str) -> dict[str, torch.Tensor]:
        path = self._path(key)
        if not path.exists():
            raise KeyError(key)
        return load_file(str(path))

    def get(self, key: str) -> torch.Tensor:
        """The tensor stored under `key`, same dtype, shape and bits; KeyError if absent."""
        path = self._path(key)
        if not path.exists():
            raise KeyError(key)
        return load_file(str(path))[_TENSOR_NAME]

    def drop(self, key: str) -> None:
        """Forget `key` and free its disk space; a missing key is fine (idempotent)."""
        self._path(key).unlink(missing_ok=True)

    def drop_size(self, key: str) -> int:
        """`drop`, returning the bytes freed (0 if absent)."""
        path = self._path(key)
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        return size

    def size(self, key: str) -> int:
        """Bytes of the file under `key` (0 if absent)."""
        path = self._path(key)
        return path.stat().st_size if path.exists() else 0

    def __contains__(self, key: str) -> bool:
        return self._path(key).exists()

    @property
    def num_bytes(self) -> int:
        """Bytes on disk of every stored tensor (file sizes, headers included)."""
        return sum(p.stat().st_size for p in self.directory.glob(f"*{_SUFFIX}"))
