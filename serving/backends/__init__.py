"""Engines behind one small interface: torch, ONNX Runtime (decode), vLLM (prefill).

`registry.build_engine(name, ctx)` imports a backend's packages only when it is chosen, so
a missing `onnxruntime` or `vllm` matters only to a role configured to use it.
"""
