"""C++ CPU kernels, built on first use with `torch.utils.cpp_extension` (JIT, cached per
machine under `$INFEROS_HOME/torch_extensions`) and called as `torch.ops.inferos.*`."""
