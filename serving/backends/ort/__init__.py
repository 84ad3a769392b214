"""ONNX Runtime decode backend: the exported dense decode step on DirectML / NPU / CUDA / CPU."""
