"""Shared fixtures of the unit tests: the default model's folder and tokenizer.

One torch thread: the box has 2 cores shared with other jobs, and with 2 intra-op threads
OpenMP's spin-waiting makes each decode step an order of magnitude slower under contention.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_folder() -> Path:
    from serving.models.pull import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def tokenizer(model_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_folder)
