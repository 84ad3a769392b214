"""Quantized weights kept on disk beside the converted models, so a second load of the same
model in the same format skips quantizing.

One safetensors file per (model folder, format), under `$INFEROS_HOME/models/.quantized/`
(the model folder itself may be a user's read-only checkout). Its name carries a hash of
what the tensors were computed from: the folder's path, each weight file's name, size and
mtime, the format and the quantizer's version. A re-converted or edited model (new mtime)
or a changed quantizer is then a miss, never a stale hit; the file of the older key is
removed when the new one is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from serving.env import inferos_home

logger = logging.getLogger(__name__)

# Bump when a quantizer's output changes: every cached file then misses.
QUANT_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def cache_dir() -> Path:
    return inferos_home() / "models" / ".quantized"


def source_key(folder: Path, fmt: str) -> str:
    """A hash of the folder's weight files (name, size, mtime) and the format."""
    folder = folder.resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([str(folder), fmt, QUANT_VERSION, stamp])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_tensors(
    folder: Path, fmt: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The tensors `compute()` returns for `folder` in format `fmt`, from the cache file if
    one matches the folder's current weights, else computed and written (atomically: a
    reader never sees half a file; two processes racing both write the same bytes)."""
    resolved = Path(folder).resolve()
    # the folder's own hash in the prefix: two folders of one name never clean up each other
    prefix = f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}.{fmt}."
    path = cache_dir() / f"{prefix}{source_key(Path(folder), fmt)}.safetensors"
    if path.is_file():
        logger.info("quantized weights from %s", path)
        return load_file(str(path))
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.chmod(0o644)  # shared by every engineer and replica on the box, as the models are
    tmp.replace(path)
    for stale in path.parent.glob(f"{prefix}*.safetensors"):
        if stale != path:
            stale.unlink(missing_ok=True)
    logger.info("quantized weights written to %s", path)
    return tensors
