// Weight-only int4 linear, asymmetric per group of 32 inputs (GGUF's Q4_1 grid, and
// `model.weights: int4`'s groups of 32):
//   out[m, n] = sum_g scales[n, g] * sum_{j < 32} q[n, 32 g + j] * x[m, 32 g + j]
//                   + offsets[n, g] * sum_{j < 32} x[m, 32 g + j]
// (w = q * scale + offset, q in 0..15: the offset term needs each group's activation sum
// only, computed once per row for all outputs). The int8 kernel's outer-product tiles
// (`q8_linear.cpp`): 16 output rows per tile, one input broadcast against 16 rows' weights
// per vector FMA.
//
// The codes are stored a byte each, not two per byte: at 1-8 rows these kernels are bound
// by instructions per weight, not by bytes read (measured on the Xeon with AMX, 2 threads:
// unpacking nibbles made every SmolLM2 shape ~2x slower than the int8 kernel at 1 row, and
// 1.4-1.5x slower than torch's `_weight_int4pack_mm_for_cpu`; a byte each runs within ~20 %
// of the int8 kernel and 1.2-1.4x faster than torch's from 4 rows). So `auto`'s lossless Q4_1 weights run as fast as int8 ones, exactly.
//
// Layout (packed once in Python, `serving/kernels/q4_linear.py`): codes `[N/16, K, 16]`
// uint8; scales and offsets `[N/16, K/32, 16]` fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

constexpr int64_t kGroup = 32;  // inputs per scale and offset
constexpr int64_t kTile = 16;   // output rows per tile
constexpr int64_t kUnroll = 4;  // independent partial sums per activation row

typedef float v16f __attribute__((vector_size(64)));

// 16 codes (0..15, a byte each) -> 16 floats.
inline v16f load_codes(const uint8_t* p) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  const __m256 hi =
      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))));
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
void tile_rows(const float* x, const float* xsum, const uint8_t* codes, const float* scales,
               const float* offsets, float* out, int64_t k, int64_t n, int64_t tile,
               int64_t m0) {
  const int64_t groups = k / kGroup;
  const uint8_t* c = codes + tile * k * kTile;
  const float* s = scales + tile * groups * kTile;
  const float* o = offsets + tile * groups * kTile;
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
    v16f scale, offset;
    __builtin_memcpy(&scale, s + g * kTile, sizeof(scale));
    __builtin_memcpy(&offset, o + g * kTile, sizeof(offset));
    for (int mb = 0; mb < MB; ++mb) {
      v16f sum = part[mb][0];
      for (int u = 1; u < kUnroll; ++u) sum += part[mb][u];
      acc[mb] += scale * sum + offset * xsum[(m0 + mb) * groups + g];
    }
  }
  for (int mb = 0; mb < MB; ++mb) {
    __builtin_memcpy(out + (m0 + mb) * n + tile * kTile, &acc[mb], sizeof(v16f));
  }
}

void tile_all_rows(const float* x, const float* xsum, const uint8_t* codes, const float* scales,
                   const float* offsets, float* out, int64_t m_rows, int64_t k, int64_t n,
                   int64_t tile) {
  int64_t m = 0;
  for (; m + 4 <= m_rows; m += 4) tile_rows<4>(x, xsum, codes, scales, offsets, out, k, n, tile, m);
  switch (m_rows - m) {
    case 3: tile_rows<3>(x, xsum, codes, scales, offsets, out, k, n, tile, m); break;
    case 2: tile_rows<2>(x, xsum, codes, scales, offsets, out, k, n, tile, m); break;
    case 1: tile_rows<1>(x, xsum, codes, scales, offsets, out, k, n, tile, m); break;
    default: break;
  }
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2, "q4_linear: x must be [M, K]");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kTile && codes.scalar_type() == at::kByte,
              "q4_linear: codes must be uint8 [N/16, K, 16]");
  const int64_t m_rows = x.size(0), k = x.size(1), tiles = codes.size(0), n = tiles * kTile;
  TORCH_CHECK(codes.size(1) == k && k % kGroup == 0, "q4_linear: K must match, a multiple of 32");
  for (const at::Tensor* t : {&scales, &offsets}) {
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->size(0) == tiles &&
                    t->size(1) == k / kGroup && t->size(2) == kTile,
                "q4_linear: scales and offsets must be float32 [N/16, K/32, 16]");
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  // each row's sum per group of inputs: the offsets' term, shared by every output (summed
  // here: a torch op costs more than the sum at one row)
  const int64_t groups = k / kGroup;
  std::vector<float> xsum(m_rows * groups, 0.0f);
  for (int64_t m = 0; m < m_rows; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      float total = 0.0f;
      for (int64_t j = 0; j < kGroup; ++j) total += xp[m * k + g * kGroup + j];
      xsum[m * groups + g] = total;
    }
  }
  const at::Tensor c = codes.contiguous();
  const at::Tensor s = scales.contiguous();
  const at::Tensor o = offsets.contiguous();
  at::Tensor out = at::empty({m_rows, n}, x.options().dtype(at::kFloat));
  const float* xs = xsum.data();
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* op = o.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tile_all_rows(xp, xs, cp, sp, op, outp, m_rows, k, n, t);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferos, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scales, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(inferos, CPU, m) { m.impl("q4_linear", &q4_linear); }
