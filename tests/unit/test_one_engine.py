"""Where one engine per node replaces the P/D split, and the dtypes `auto` resolves to."""

from __future__ import annotations

import pytest

from serving.backends.placement import one_engine_per_node
from serving.config import InferosConfig, cpu_has_native_bf16


def _cfg(**over) -> InferosConfig:
    return InferosConfig.model_validate(over)


def test_cpu_only_single_node_auto_runs_one_engine_with_every_core() -> None:
    cfg = one_engine_per_node(_cfg(), num_nodes=1)
    assert not cfg.has_prefill_replicas
    assert cfg.threads_for("decode", 2) == 2
    assert _cfg().threads_for("decode", 2) == 1  # two engines would split the cores


@pytest.mark.parametrize(
    "over, nodes",
    [
        ({"scheduling": {"pd_mode": "disaggregated"}}, 1),
        ({"scheduling": {"pd_mode": "colocated"}}, 1),  # kept as configured
        ({}, 2),  # several nodes: prefill may land elsewhere
        ({"prefill": {"num_gpus": 1}}, 1),
        ({"decode": {"resources": {"NPU": 1}}}, 1),
        ({"prefill": {"accelerator_type": "A100"}}, 1),
        ({"prefill": {"backend": "vllm"}}, 1),
        ({"prefill": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}}, 1),
    ],
)
def test_the_split_stays_where_it_can_pay_or_is_asked_for(over: dict, nodes: int) -> None:
    cfg = _cfg(**over)
    assert one_engine_per_node(cfg, nodes) == cfg


def test_decode_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="decode.num_replicas"):
        _cfg(decode={"num_replicas": 0})
    assert not _cfg(prefill={"num_replicas": 0}).has_prefill_replicas


def test_auto_dtypes_follow_the_cpu() -> None:
    native = cpu_has_native_bf16()
    cfg = _cfg()
    assert cfg.model_dtype == ("bfloat16" if native else "float32")
    assert cfg.kv_dtype == cfg.model_dtype and cfg.fast_kernels
    bf16 = _cfg(model={"dtype": "bfloat16"})
    assert bf16.kv_dtype == ("bfloat16" if native else "float32")
    exact = _cfg(model={"dtype": "float32"})
    assert exact.model_dtype == exact.kv_dtype == "float32" and not exact.fast_kernels
    assert _cfg(kv_cache={"dtype": "bfloat16"}).kv_dtype == "bfloat16"
