"""Which ONNX Runtime execution provider a session runs on.

The configured preference list is walked in order; a provider this onnxruntime build lacks
is skipped with a warning, never an error, and CPU is always the last resort, so a config
written for a DirectML laptop or a Ryzen AI box still starts on a plain CPU node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# DirectML (Windows GPUs/NPUs), Ryzen AI's NPU (Vitis AI), CUDA, then CPU.
DEFAULT_PREFERENCE = (
    "DmlExecutionProvider",
    "VitisAIExecutionProvider",
    "CUDAExecutionProvider",
    CPU,
)


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    providers: tuple[str, ...]  # what to hand InferenceSession, best first, CPU last
    requested: tuple[str, ...]
    missing: tuple[str, ...]  # requested but absent from this onnxruntime build

    @property
    def first(self) -> str:
        return self.providers[0]

    @property
    def fell_back(self) -> bool:
        """The first choice of the configuration is not the one used."""
        return bool(self.requested) and self.requested[0] != self.first


def choose_providers(
    preference: list[str] | tuple[str, ...], available: list[str]
) -> ProviderChoice:
    """Keep the preferred providers this build has, in order, and end with CPU."""
    chosen = [p for p in preference if p in available]
    missing = tuple(p for p in preference if p not in available)
    if CPU not in chosen:
        chosen.append(CPU)
    choice = ProviderChoice(tuple(chosen), tuple(preference), missing)
    if missing:
        logger.warning(
            "ONNX Runtime providers %s are not available here (available: %s); using %s",
            list(missing),
            available,
            choice.first,
        )
    return choice
