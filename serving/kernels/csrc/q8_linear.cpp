// Weight-only int8 linear with one fp32 scale per group of 32 inputs (GGUF's Q8_0 grid):
//   out[m, n] = sum_g scales[n, g] * sum_{j < 32} codes[n, 32 g + j] * x[m, 32 g + j]
// Single-stream decode is bound by the bytes of weights read per step; SmolLM2's tied
// embedding / LM head is stored as Q8_0 (49152 x 576), so reading its int8 codes moves a
// quarter of the fp32 bytes and half of the bf16 ones, with the exact weights (each
// code * scale is exact in fp32) where a bf16 copy rounds them.
//
// Layout (packed once in Python, `serving/kernels/q8_linear.py`): 16 output rows form a
// tile, codes `[N/16, K, 16]` and scales `[N/16, K/32, 16]`, so one input element is
// broadcast against 16 outputs' codes in one vector FMA (the outer-product form of
// llama.cpp's and oneDNN's small-M GEMMs). A row-by-row dot product instead is one serial
// FMA chain per row and runs at the FMA's latency, not its throughput. GCC vector
// extensions compile to AVX-512 or AVX2 alike under -march=native.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int64_t kGroup = 32;  // inputs per scale
constexpr int64_t kTile = 16;   // output rows per tile
constexpr int64_t kUnroll = 4;  // independent partial sums per activation row

typedef float v16f __attribute__((vector_size(64)));
// 16 int8 codes -> 16 floats. GCC's generic vector conversions lower the sign extension
// to 16 scalar moves, so the widening is written with the ISA's own instructions.
inline v16f load_codes(const int8_t* p) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  const __m256 hi =
      _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
  v16f w;
  __builtin_memcpy(&w, &lo, sizeof(lo));
  __builtin_memcpy(reinterpret_cast<char*>(&w) + sizeof(lo), &hi, sizeof(hi));
  return w;
#else
  v16f w;
  for (int i = 0; i < 16; ++i) w[i] = static_cast<float>(p[i]);
  return w;
#endif
}

// Rows [m0, m0 + MB) of x against one tile: out[m, tile * 16 .. + 16].
template <int MB>
void tile_rows(const float* x, const int8_t* codes, const float* scales, float* out, int64_t k,
               int64_t n, int64_t tile, int64_t m0) {
  const int64_t groups = k / kGroup;
  const int8_t* c = codes + tile * k * kTile;
  const float* s = scales + tile * groups * kTile;
  v16f acc[MB] = {};
  for (int64_t g = 0; g < groups; ++g) {
    v16f part[MB][kUnroll] = {};
    const int64_t j0 = g * kGroup;
    for (int64_t j = 0; j < kGroup; j += kUnroll) {
      for (int u = 0; u < kUnroll; ++u) {
        const v16f w = load_codes(c + (j0 + j + u) * kTile);
        for (int mb = 0; mb < MB; ++mb) part[mb][u] += x[(m0 + mb) * k + j0 + j + u] * w;
      }
    }
    v16f scale;
    __builtin_memcpy(&scale, s + g * kTile, sizeof(scale));
    for (int mb = 0; mb < MB; ++mb) {
      v16f sum = part[mb][0];
      for (int u = 1; u < kUnroll; ++u) sum += part[mb][u];
      acc[mb] += scale * sum;
    }
  }
  for (int mb = 0; mb < MB; ++mb) {
    __builtin_memcpy(out + (m0 + mb) * n + tile * kTile, &acc[mb], sizeof(v16f));
  }
}

void tile_all_rows(const float* x, const int8_t* codes, const float* scales, float* out,
                   int64_t m_rows, int64_t k, int64_t n, int64_t tile) {
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) tile_rows<4>(x, codes, scales, out, k, n, tile, m);
  switch (m_rows - m) {
    case 3: tile_rows<3>(x, codes, scales, out, k, n, tile, m); break;
    case 2: tile_rows<2>(x, codes, scales, out, k, n, tile, m); break;
    case 1: tile_rows<1>(x, codes, scales, out, k, n, tile, m); break;
    default: break;
  }
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2, "q8_linear: x must be [M, K]");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kTile && codes.scalar_type() == at::kChar,
              "q8_linear: codes must be int8 [N/16, K, 16]");
  TORCH_CHECK(scales.dim() == 3 && scales.scalar_type() == at::kFloat,
              "q8_linear: scales must be float32 [N/16, K/32, 16]");
  const int64_t m_rows = x.size(0), k = x.size(1), tiles = codes.size(0), n = tiles * kTile;
  TORCH_CHECK(codes.size(1) == k && k % kGroup == 0, "q8_linear: K must match, a multiple of 32");
  TORCH_CHECK(scales.size(0) == tiles && scales.size(1) == k / kGroup && scales.size(2) == kTile,
              "q8_linear: scales must be [N/16, K/32, 16]");
  // activations are few (the rows that sample): one fp32 copy, read by every tile
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor c = codes.contiguous();
  const at::Tensor s = scales.contiguous();
  at::Tensor out = at::empty({m_rows, n}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* cp = c.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_all_rows(xp, cp, sp, op, m_rows, k, n, t);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferos, m) {
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(inferos, CPU, m) { m.impl("q8_linear", &q8_linear); }
