// Weight-only int4 linear, asymmetric per group of 32 inputs (GGUF's Q4_1 grid, and
// `model.weights: int4`'s groups of 32):
//   out[m, n] = sum_g scales[n, g] * sum_{j < 32} q[n, 32 g + j] * x[m, 32 g + j]
//                   + offsets[n, g] * sum_{j < 32} x[m, 32 g + j]
// (w = q * scale + offset, q in 0..15: the offset term needs each group's activation sum
// only, computed once per row for all outputs). The int8 kernel's outer-product tiles
// (`q8_linear.cpp`): 16 output rows per tile, one input broadcast against 16 rows' weights
// per vector FMA.
//
// The codes are stored two to a byte, inputs 2p and 2p+1 of a row in the low and high
// nibble: at 1-4 rows a decode step is bound by the bytes read (SmolLM2's 30 layers read
// 160 MB of byte codes and scales per step, 80 MB of nibbles, from memory: every layer's
// weights are evicted by the others'), and splitting a byte into two costs an AND and a
// shift per 32 weights. The sums are formed in the same order as with byte codes (inputs
// 4i..4i+3 into four partial sums), so the result is bit-identical to theirs.
//
// Layout (packed once in Python, `serving/kernels/q4_linear.py`): codes `[N/16, K/2, 16]`
// uint8 (byte [t, p, i] = q[16t + i, 2p] | q[16t + i, 2p + 1] << 4); scales and offsets
// `[N/16, K/32, 16]` fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

constexpr int64_t kGroup = 32;  // inputs per scale and offset
constexpr int64_t kTile = 16;   // output rows per tile
constexpr int64_t kUnroll = 4;  // independent partial sums per activation row

typedef float v16f __attribute__((vector_size(64)));

// 16 bytes of codes (16 outputs' inputs 2p and 2p+1) -> the 16 floats of input 2p (low
// nibbles) and of input 2p+1 (high nibbles).
inline void load_code_pair(const uint8_t* p, v16f& even, v16f& odd) {
#if defined(__AVX512F__)
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  even = (v16f)_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
  odd = (v16f)_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
#elif defined(__AVX2__)
  for (int half = 0; half < 2; ++half) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * half)));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
    __builtin_memcpy(reinterpret_cast<char*>(&even) + half * sizeof(lo), &lo, sizeof(lo));
    __builtin_memcpy(reinterpret_cast<char*>(&odd) + half * sizeof(hi), &hi, sizeof(hi));
  }
#else
  for (int i = 0; i < 16; ++i) {
    even[i] = static_cast<float>(p[i] & 15);
    odd[i] = static_cast<float>(p[i] >> 4);
  }
#endif
}

// Rows [m0, m0 + MB) of x against one tile: out[m, tile * 16 .. + 16].
template <int MB>
void tile_rows(const float* x, const float* xsum, const uint8_t* codes, const float* scales,
               const float* offsets, float* out, int64_t k, int64_t n, int64_t tile,
               int64_t m0) {
  const int64_t groups = k / kGroup;
  const uint8_t* c = codes + tile * (k / 2) * kTile;
  const float* s = scales + tile * groups * kTile;
  const float* o = offsets + tile * groups * kTile;
  v16f acc[MB] = {};
  for (int64_t g = 0; g < groups; ++g) {
    v16f part[MB][kUnroll] = {};
    const int64_t j0 = g * kGroup;
    static_assert(kUnroll % 2 == 0, "inputs come in pairs, one byte");
    for (int64_t j = 0; j < kGroup; j += kUnroll) {
      for (int u = 0; u < kUnroll; u += 2) {
        v16f w_even, w_odd;
        load_code_pair(c + (j0 + j + u) / 2 * kTile, w_even, w_odd);
        for (int mb = 0; mb < MB; ++mb) {
          part[mb][u] += x[(m0 + mb) * k + j0 + j + u] * w_even;
          part[mb][u + 1] += x[(m0 + mb) * k + j0 + j + u + 1] * w_odd;
        }
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
              "q4_linear: codes must be uint8 [N/16, K/2, 16]");
  const int64_t m_rows = x.size(0), k = x.size(1), tiles = codes.size(0), n = tiles * kTile;
  TORCH_CHECK(codes.size(1) * 2 == k && k % kGroup == 0,
              "q4_linear: K must match (two codes a byte), a multiple of 32");
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
