"""Memory accounting (issue 16, item 4): what a replica measures of itself, and the plan
`inferos serve --dry-run` prints and refuses, from a model folder's headers alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save_file
from torch import nn

from serving.cli import main
from serving.config import InferosConfig
from serving.memory import MemoryAccount, tensor_bytes
from serving.metrics import MEMORY_KINDS, EngineMetrics
from serving.plan import kv_bytes_per_block, make_plan, safetensors_numel

CFG = {
    "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100,
}  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    save_file({"a": torch.zeros(100, 64), "b": torch.zeros(3, 5, 7)}, tmp_path / "m.safetensors")
    save_file({"c": torch.zeros(10)}, tmp_path / "n.safetensors")
    return tmp_path


def test_tensor_bytes_counts_shared_storage_once() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # a tied head
    model.register_buffer("scale", torch.ones(3, dtype=torch.float64))
    assert tensor_bytes(model) == 10 * 4 * 4 + 3 * 8


def test_a_sample_has_every_kind_and_the_metric_exports_them() -> None:
    account = MemoryAccount.after_load(nn.Linear(8, 8), kv_budget=4096)
    sample = account.sample(kv_used=1024)
    assert tuple(sample) == MEMORY_KINDS
    assert sample["weights"] == (64 + 8) * 4 and sample["kv_budget"] == 4096
    assert sample["kv_used"] == 1024 and sample["workspace_peak"] >= 0 and sample["rss"] > 0
    assert _peak_rise_in_a_fresh_process() >= 32 << 20
    metrics = EngineMetrics("m", "decode", "r")
    assert _memory_samples(metrics) == {kind: 0.0 for kind in MEMORY_KINDS}  # from the start
    metrics.memory(sample)
    assert _memory_samples(metrics) == {kind: float(n) for kind, n in sample.items()}


def _peak_rise_in_a_fresh_process() -> int:
    """workspace_peak after touching 64 MiB past the loaded state, in a fresh process that
    first peaked higher while "loading" (the peak must start afresh after loading)."""
    code = (
        "import torch\n"
        "from serving.memory import MemoryAccount\n"
        "spike = torch.ones(256 << 20, dtype=torch.uint8)\n"
        "spike.add_(1)\n"
        "del spike\n"
        "account = MemoryAccount.after_load(None, 0)\n"
        "big = torch.ones(64 << 20, dtype=torch.uint8)\n"
        "big.add_(1)\n"
        "print(account.sample(0)['workspace_peak'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _memory_samples(metrics: EngineMetrics) -> dict[str, float]:
    return {
        s.labels["kind"]: s.value
        for fam in text_string_to_metric_families(metrics.exposition())
        for s in fam.samples
        if s.name == "inferos:memory_bytes"
    }


def test_the_plan_reads_shapes_from_the_headers(folder: Path) -> None:
    assert safetensors_numel(folder) == 100 * 64 + 3 * 5 * 7 + 10
    assert kv_bytes_per_block(CFG, block_size=16, dtype="bfloat16") == 3 * 2 * 16 * 2 * 16 * 2
    config = InferosConfig.model_validate(
        {"model": {"dtype": "float32", "weights": "bf16"}, "kv_cache": {"dtype": "float32"}}
    )
    plan = make_plan(config, folder, available=64 << 30)
    (decode,) = [r for r in plan.replicas if r.role == "decode"]
    assert decode.weights == safetensors_numel(folder) * 4
    assert decode.kv_budget == config.kv_cache.num_blocks * kv_bytes_per_block(CFG, 16, "float32")
    assert plan.total == sum(r.each * r.count for r in plan.replicas) + plan.kv_store_budget
    assert plan.refusal() is None and "decode" in plan.table()


def test_a_plan_beyond_the_memory_is_refused_with_what_to_change(folder: Path) -> None:
    config = InferosConfig.model_validate({"decode": {"num_replicas": 3}})
    plan = make_plan(config, folder, available=1 << 30)  # 1 GiB: the store budget alone is 2
    why = plan.refusal()
    assert why is not None and "kv_cache.store_budget_bytes" in why and "1.00 GiB" in why


def test_dry_run_exits_2_for_an_impossible_config_and_0_otherwise(folder: Path, capsys) -> None:
    assert main(["serve", "--dry-run", "--model", str(folder)]) == 0
    assert "fits" in capsys.readouterr().out
    code = main(["serve", "--dry-run", "--model", str(folder), "--decode-replicas", "100000"])
    assert code == 2
    assert "refused" in capsys.readouterr().err
