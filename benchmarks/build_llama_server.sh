#!/usr/bin/env bash
# Build llama.cpp's native `llama-server`, the peer that `peer_bench.py --llama-url` measures.
# PyPI is the only registry this kind of machine reaches, so the source is the llama.cpp that
# the llama-cpp-python sdist vendors. Usage: benchmarks/build_llama_server.sh [BUILD_DIR]
# Prints the binary's path last. Takes ~10 min on 2 cores.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BUILD_DIR="${1:-${TMPDIR:-/tmp}/llama-server-build}"
mkdir -p "$BUILD_DIR"
cd "$BUILD_DIR"
SDIST="llama_cpp_python-${VERSION}.tar.gz"
if [ ! -f "$SDIST" ]; then
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==${VERSION}" -d .
fi
SRC="llama_cpp_python-${VERSION}/vendor/llama.cpp"
[ -d "$SRC" ] || tar xzf "$SDIST"

# With GGML_NATIVE on an AMX CPU, ggml's AMX path crashed on the 2-vCPU Xeon VM we measured
# on: there, build for AVX-512 explicitly with AMX off; elsewhere -march=native is best.
if grep -q amx_tile /proc/cpuinfo; then
  ISA=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
       -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
       -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
else
  ISA=(-DGGML_NATIVE=ON)
fi
cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF "${ISA[@]}"
cmake --build "$SRC/build" --target llama-server -j "$(nproc)"
echo "$BUILD_DIR/$SRC/build/bin/llama-server"
