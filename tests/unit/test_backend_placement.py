"""Per-role device settings → ray_actor_options, with CPU fallback where the cluster lacks them."""

from __future__ import annotations

import logging

from deployments.app import actor_options
from serving.backends.placement import placement_options
from serving.config import RoleSettings

GPU_NODE = {"CPU": 16.0, "GPU": 2.0, "accelerator_type:A100": 1.0, "memory": 1e11}
NPU_NODE = {"CPU": 8.0, "NPU": 1.0, "memory": 1e10}
CPU_BOX = {"CPU": 2.0, "memory": 1e10}


def test_settings_map_to_ray_actor_options_on_a_cluster_that_has_them() -> None:
    prefill = RoleSettings(num_gpus=1, accelerator_type="A100")
    options, notes = placement_options("prefill", prefill, GPU_NODE)
    assert options == {
        "num_cpus": 0.5,
        "num_gpus": 1,
        "resources": {},
        "accelerator_type": "A100",
    }
    assert notes == []
    decode = RoleSettings(resources={"NPU": 1}, num_cpus=1)
    options, notes = placement_options("decode", decode, NPU_NODE | GPU_NODE)
    assert options["resources"] == {"NPU": 1} and options["num_gpus"] == 0 and not notes


def test_absent_devices_fall_back_to_cpu_and_say_so(caplog) -> None:
    role = RoleSettings(num_gpus=1, resources={"NPU": 1, "CPU_FAST": 2}, accelerator_type="A100")
    with caplog.at_level(logging.WARNING, logger="serving.backends.placement"):
        options, notes = placement_options("decode", role, CPU_BOX)
    assert options == {"num_cpus": 0.5, "num_gpus": 0, "resources": {}}
    assert len(notes) == 4
    assert "num_gpus=1" in caplog.text and "NPU" in caplog.text and "A100" in caplog.text
    # a cluster that has part of it keeps that part
    options, notes = placement_options("decode", role, CPU_BOX | {"NPU": 4.0})
    assert options["resources"] == {"NPU": 1} and len(notes) == 3


def test_unknown_cluster_passes_settings_through() -> None:
    role = RoleSettings(num_gpus=1, resources={"NPU": 1})
    options, notes = placement_options("prefill", role, None)
    assert options["num_gpus"] == 1 and options["resources"] == {"NPU": 1} and notes == []


def test_app_actor_options_keep_the_thread_env() -> None:
    options = actor_options(RoleSettings(num_gpus=1), 2, "prefill", CPU_BOX)
    assert options["num_gpus"] == 0
    assert options["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "2"}}
