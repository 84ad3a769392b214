"""Backend selection: the registry by name, the execution-provider fallback, the config."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from serving.backends.base import BackendContext
from serving.backends.ort.providers import CPU, DEFAULT_PREFERENCE, choose_providers
from serving.backends.registry import BACKENDS, build_engine
from serving.config import InferosConfig
from serving.messages import Role


def test_registry_names_and_unknown_backend() -> None:
    assert {"torch", "onnxruntime"} <= set(BACKENDS)
    ctx = BackendContext(InferosConfig(), Role.DECODE, model_path=None, num_threads=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; choose one of"):
        build_engine("tensorrt", ctx)


def test_config_backend_per_role_and_default_providers() -> None:
    cfg = InferosConfig.model_validate(
        {"decode": {"backend": "onnxruntime", "resources": {"NPU": 1}}}
    )
    assert cfg.decode.backend == "onnxruntime"
    assert cfg.prefill.backend == "torch"
    assert cfg.decode.execution_providers == list(DEFAULT_PREFERENCE)
    assert DEFAULT_PREFERENCE[0] == "DmlExecutionProvider" and DEFAULT_PREFERENCE[-1] == CPU
    with pytest.raises(ValidationError, match="backend"):
        InferosConfig.model_validate({"decode": {"backend": "tensorrt"}})


def test_first_available_provider_is_chosen_in_preference_order() -> None:
    available = ["CUDAExecutionProvider", "DmlExecutionProvider", CPU]
    choice = choose_providers(["DmlExecutionProvider", "CUDAExecutionProvider", CPU], available)
    assert choice.providers == ("DmlExecutionProvider", "CUDAExecutionProvider", CPU)
    assert choice.first == "DmlExecutionProvider" and not choice.fell_back
    assert choice.missing == ()


def test_absent_provider_falls_back_to_cpu_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="serving.backends.ort.providers"):
        choice = choose_providers(["VitisAIExecutionProvider"], ["AzureExecutionProvider", CPU])
    assert choice.providers == (CPU,)
    assert choice.fell_back and choice.missing == ("VitisAIExecutionProvider",)
    assert "VitisAIExecutionProvider" in caplog.text and "using CPUExecutionProvider" in caplog.text


def test_real_session_on_an_absent_provider_starts_on_cpu(tmp_path, caplog) -> None:
    """The real onnxruntime, asked for DirectML first: a session on CPU, not an error."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from serving.backends.ort.runner import make_session

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "relu.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    assert "DmlExecutionProvider" not in ort.get_available_providers()
    with caplog.at_level(logging.WARNING):
        session, choice = make_session(path, ["DmlExecutionProvider", CPU], 1)
    assert session.get_providers()[0] == CPU == choice.first
    assert "DmlExecutionProvider" in caplog.text
