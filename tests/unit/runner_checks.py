"""Helpers of the tests that compare our model runner's logits with transformers'
(`test_model_logits.py` for the default model, `test_families.py` for each family)."""

from __future__ import annotations

import torch

from serving.engine.model_runner import ModelRunner
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import SchedulerOutput
from serving.engine.sequence import Sequence


def seq_with_blocks(req_id: str, token_ids: list[int], block_table: list[int]) -> Sequence:
    """A greedy sequence that already owns `block_table` (no block pool involved)."""
    seq = Sequence(req_id, list(token_ids), SamplingParams(temperature=0.0))
    seq.block_table = list(block_table)
    return seq


def all_logits(runner: ModelRunner, batch: SchedulerOutput) -> torch.Tensor:
    """Logits at every scheduled position (the runner's `execute` keeps only the last)."""
    input_ids, positions, meta = runner._prepare(batch)
    hidden = runner.model(input_ids, positions, runner.kv_cache, meta)
    return runner.model.compute_logits(hidden)


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    assert x.shape == y.shape, (x.shape, y.shape)
    return (x - y).abs().max().item()
