// Int4 linear on AMX for decode batches (W4A8, as llama.cpp's Q4_1 x Q8_1 AMX path):
//   out[m, n] = sum_g xs[m, g] * scales[n, g] * sum_{j < 32} a[m, 32 g + j] * q[n, 32 g + j]
//                   + sum_g offsets[n, g] * sum_{j < 32} x[m, 32 g + j]
// with w = q * scale + offset (q in 0..15 per group of 32 inputs: the GGUF's Q4_1 weights
// exactly) and each group of 32 activations rounded to int8, a = round(x / xs),
// xs = max|x| / 127, as llama.cpp rounds them before every quantized matmul; the offsets'
// term takes the exact fp32 group sums. Activations are read, and the output written, in
// the activations' dtype (bf16 or fp32): no cast copies around the call.
//
// Why: on this machine kind (2 vCPUs, one core's AMX unit) a decode step of 8-32 rows is
// bound by the core's work per weight, not by bytes alone: oneDNN's bf16 matmul runs ~11
// GB/s of weights there. One TDPBSSD multiplies 16 rows by 16 outputs over a group straight
// from the codes (read as nibbles: 6 bits a weight with the fp32 scales, against bf16's
// 16); what remains per group is scaling 16 rows of int32 sums. Measured, 30 layers of
// SmolLM2, caches cold: 1.4-1.9x faster than dense bf16 at 8-32 rows, 1.4-2x faster than the
// exact vector kernel (`q4_linear.cpp`) from 4 rows. Rounding to bf16 weights instead and
// multiplying bf16 tiles (the dense path's numerics) measured slower than oneDNN: the
// dequantization costs ~10 instructions per 32 weights at every row count. The int8
// activations cost perplexity: benchmarks/results/2026-12-06/int4-amx.
//
// Without AMX (AMD EPYC Zen 4/5, Intel Ice Lake), the same numbers come from AVX-512 VNNI:
// VPDPBUSD multiplies 16 outputs' codes (unsigned) by 4 broadcast int8 activations (signed)
// per instruction, 8 of them per group and row, from the same packed tiles. The int32 group
// sums are exact on both paths and scaled in the same order, so the two paths give
// bit-identical outputs; only the speed differs. (On a 2-vCPU Zen 5 with bf16 dense matmuls
// through oneDNN's AVX-512-BF16, the start-up measurement decides per layer shape up to which
// batch this kernel runs: `serving/models/int4.py`.)
//
// Layout (packed once in Python, `serving/kernels/q4_amx.py`), per tile of 16 outputs and
// group of 32 inputs, 256 bytes: the AMX B operand [8 rows][16 outputs][4 inputs] (VNNI
// order) as nibbles, bytes 128 c + i (i < 64) and 128 c + 64 + i the low and high nibble
// of byte 64 c + i, c < 4; scales and offsets [N/16, K/32, 16] fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;                   // inputs per scale and offset
constexpr int64_t kTile = 16;                    // outputs per tile (AMX B columns)
constexpr int64_t kRows = 16;                    // activation rows per AMX A tile
constexpr int64_t kPacked = kGroup * kTile / 2;  // nibble bytes per (tile, group)
constexpr int64_t kUnpacked = kGroup * kTile;    // code bytes per (tile, group)

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__)
#define Q4_AMX_TILES 1
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q4_AMX_VNNI 1
#endif

#if defined(Q4_AMX_TILES) || defined(Q4_AMX_VNNI)
constexpr bool kBuilt = true;

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#if defined(Q4_AMX_TILES)
// Linux hands out the AMX register state only to processes that ask (arch_prctl).
bool amx_permitted() {
  static const bool permitted = [] {
    constexpr int kArchReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}

// tmm0-2 and tmm3-5: two sets of C (16 rows x 16 int32), A (16 rows x 32 int8) and B
// (8 rows x 16 outputs x 4 inputs). Per thread, on every call: oneDNN configures the same
// registers its own way between ours.
void configure_tiles() {
  alignas(64) TileConfig config = {};
  config.palette_id = 1;
  for (int set = 0; set < 2; ++set) {
    config.rows[3 * set] = kRows;
    config.colsb[3 * set] = kTile * 4;
    config.rows[3 * set + 1] = kRows;
    config.colsb[3 * set + 1] = kGroup;
    config.rows[3 * set + 2] = kGroup / 4;
    config.colsb[3 * set + 2] = kTile * 4;
  }
  _tile_loadconfig(&config);
}
#else
bool amx_permitted() { return false; }
#endif

inline __m512 load_floats(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load_floats(const at::BFloat16* p) {  // bf16: the top half of an fp32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store_floats(float* p, __m512 v) { _mm512_storeu_ps(p, v); }

inline void store_floats(at::BFloat16* p, __m512 v) {  // round to nearest even, as torch
#if defined(__AVX512BF16__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
#else  // the same rounding in integer ops (finite values: these are sums of finite products)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
#endif
}

// Rows [0, m_rows) of x -> a (int8), with each group's xs and exact sum.
template <typename T>
void quantize_rows(const T* x, int64_t m_rows, int64_t k, int8_t* a, float* xs, float* sx) {
  const int64_t groups = k / kGroup;
  at::parallel_for(0, m_rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t g = 0; g < groups; ++g) {
        const T* p = x + m * k + g * kGroup;
        const __m512 v0 = load_floats(p), v1 = load_floats(p + 16);
        const float amax =
            _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        // round half to even (the MXCSR default), as llama.cpp's quantize_row_q8_1
        const __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)));
        const __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a + m * k + g * kGroup), q0);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a + m * k + g * kGroup + 16), q1);
        xs[m * groups + g] = amax / 127.f;
        sx[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
      }
    }
  });
}

// One tile's codes, every group, from nibbles to the B operand's bytes.
void unpack_tile(const uint8_t* packed, int64_t groups, uint8_t* codes) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t i = 0; i < groups * (kPacked / 64); ++i) {
    const __m512i bytes = _mm512_loadu_si512(packed + i * 64);
    _mm512_storeu_si512(codes + i * 128, _mm512_and_si512(bytes, low));
    _mm512_storeu_si512(codes + i * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low));
  }
}

// Rows [0, m_rows) in full blocks of kBlock, then what is left in one pass of the smallest
// of 1, 2, 4, 8 (or kBlock) rows that covers it: `pass(std::integral_constant<int, R>, m0,
// rows)` runs rows [m0, m0 + rows) with R >= rows, so each kernel's row count is a
// compile-time constant (its accumulators stay in registers).
template <int kBlock, typename Pass>
void for_row_blocks(int64_t m_rows, Pass&& pass) {
  int64_t m = 0;
  for (; m + kBlock <= m_rows; m += kBlock) pass(std::integral_constant<int, kBlock>{}, m, kBlock);
  const int64_t left = m_rows - m;
  if (left == 0) return;
  if (left <= 1) {
    pass(std::integral_constant<int, 1>{}, m, left);
  } else if (left <= 2) {
    pass(std::integral_constant<int, 2>{}, m, left);
  } else if (left <= 4) {
    pass(std::integral_constant<int, 4>{}, m, left);
  } else if (kBlock > 8 && left <= 8) {
    pass(std::integral_constant<int, 8>{}, m, left);
  } else {
    pass(std::integral_constant<int, kBlock>{}, m, left);
  }
}

#if defined(Q4_AMX_TILES)
// One group's int32 sums of 16 activation rows by 16 outputs, stored to `c_tile`. Two
// register sets (C, A, B = tmm0-2 or tmm3-5) let one group's tile multiply run while the
// vector units scale the previous group's. (A macro: the intrinsics take literal registers.)
#define DOT_GROUP(C, A, B, a, codes, k, m0, g, c_tile)    \
  do {                                                    \
    _tile_zero(C);                                        \
    _tile_loadd(A, (a) + (m0) * (k) + (g) * kGroup, (k)); \
    _tile_loadd(B, (codes) + (g) * kUnpacked, kTile * 4); \
    _tile_dpbssd(C, A, B);                                \
    _tile_stored(C, (c_tile), kTile * 4);                 \
  } while (0)

template <int R>
inline void scale_group(const int32_t* c_tile, const float* xs, const float* sx,
                        const float* scales, const float* offsets, int64_t groups, int64_t m0,
                        int64_t g, __m512* acc) {
  const __m512 d = _mm512_loadu_ps(scales + g * kTile);
  const __m512 o = _mm512_loadu_ps(offsets + g * kTile);
  for (int r = 0; r < R; ++r) {
    const int64_t at = (m0 + r) * groups + g;
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c_tile + r * kTile));
    acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(xs[at])), acc[r]);
    acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(sx[at]), acc[r]);
  }
}

// Rows [m0, m0 + min(R, rows)) against one tile, every group; the A tile reads 16 rows
// whatever R is (rows past the batch are zero padding, their xs and sums zero): R trims the
// scaling.
template <int R, typename T>
void tile_rows(const int8_t* a, const float* xs, const float* sx, const uint8_t* codes,
               const float* scales, const float* offsets, T* out, int64_t k, int64_t n,
               int64_t tile, int64_t m0, int64_t rows, int32_t* c_tiles) {
  const int64_t groups = k / kGroup;
  int32_t* c0 = c_tiles;
  int32_t* c1 = c_tiles + kRows * kTile;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 2) {
    DOT_GROUP(0, 1, 2, a, codes, k, m0, g, c0);
    if (g > 0) scale_group<R>(c1, xs, sx, scales, offsets, groups, m0, g - 1, acc);
    if (g + 1 < groups) DOT_GROUP(3, 4, 5, a, codes, k, m0, g + 1, c1);
    scale_group<R>(c0, xs, sx, scales, offsets, groups, m0, g, acc);
  }
  if (groups % 2 == 0) scale_group<R>(c1, xs, sx, scales, offsets, groups, m0, groups - 1, acc);
  for (int r = 0; r < R && r < rows; ++r) store_floats(out + (m0 + r) * n + tile * kTile, acc[r]);
}

template <typename T>
void tile_all_rows(const int8_t* a, const float* xs, const float* sx, const uint8_t* codes,
                   const float* scales, const float* offsets, T* out, int64_t m_rows, int64_t k,
                   int64_t n, int64_t tile, int32_t* c_tiles) {
  for_row_blocks<kRows>(m_rows, [&](auto r, int64_t m0, int64_t rows) {
    tile_rows<decltype(r)::value>(a, xs, sx, codes, scales, offsets, out, k, n, tile, m0, rows,
                                  c_tiles);
  });
}

#endif  // Q4_AMX_TILES

#if defined(Q4_AMX_VNNI)
// Rows [m0, m0 + R) against one tile, every group, with VPDPBUSD: per group the 8 B rows
// (inputs 4j..4j+3 of 16 outputs) stay in registers for all R rows, each row's 4 int8
// activations broadcast against them. Rows past the batch are the zero padding of `a`
// (their xs and sums zero); only the first `rows` are stored.
template <int R, typename T>
void vnni_tile_rows(const int8_t* a, const float* xs, const float* sx, const uint8_t* codes,
                    const float* scales, const float* offsets, T* out, int64_t k, int64_t n,
                    int64_t tile, int64_t m0, int64_t rows) {
  const int64_t groups = k / kGroup;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* cg = codes + g * kUnpacked;
    __m512i b[kGroup / 4];
    for (int j = 0; j < kGroup / 4; ++j) b[j] = _mm512_load_si512(cg + 64 * j);
    const __m512 d = _mm512_loadu_ps(scales + g * kTile);
    const __m512 o = _mm512_loadu_ps(offsets + g * kTile);
    for (int r = 0; r < R; ++r) {
      const int8_t* ar = a + (m0 + r) * k + g * kGroup;
      __m512i dot = _mm512_setzero_si512();
      for (int j = 0; j < kGroup / 4; ++j) {
        int32_t four;  // activations 4j..4j+3 of this row, as one lane to broadcast
        __builtin_memcpy(&four, ar + 4 * j, sizeof(four));
        dot = _mm512_dpbusd_epi32(dot, b[j], _mm512_set1_epi32(four));
      }
      // scale_group's arithmetic, in its order: the AMX path's results bit for bit
      const int64_t at = (m0 + r) * groups + g;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(xs[at])),
                               acc[r]);
      acc[r] = _mm512_fmadd_ps(o, _mm512_set1_ps(sx[at]), acc[r]);
    }
  }
  for (int r = 0; r < R && r < rows; ++r) store_floats(out + (m0 + r) * n + tile * kTile, acc[r]);
}

template <typename T>
void vnni_tile_all_rows(const int8_t* a, const float* xs, const float* sx, const uint8_t* codes,
                        const float* scales, const float* offsets, T* out, int64_t m_rows,
                        int64_t k, int64_t n, int64_t tile) {
  // 8 rows per pass: 8 B rows + 8 sums + 8 accumulators in zmm registers
  for_row_blocks<8>(m_rows, [&](auto r, int64_t m0, int64_t rows) {
    vnni_tile_rows<decltype(r)::value>(a, xs, sx, codes, scales, offsets, out, k, n, tile, m0,
                                       rows);
  });
}
#endif  // Q4_AMX_VNNI

template <typename T>
void run(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
         const at::Tensor& offsets, at::Tensor& out) {
  const int64_t m_rows = x.size(0), k = x.size(1), tiles = packed.size(0), n = tiles * kTile;
  const int64_t groups = k / kGroup;
  const int64_t m_pad = (m_rows + kRows - 1) / kRows * kRows;
  at::Tensor a = at::zeros({m_pad, k}, x.options().dtype(at::kChar));
  at::Tensor xs = at::zeros({m_pad, groups}, x.options().dtype(at::kFloat));
  at::Tensor sx = at::zeros({m_pad, groups}, x.options().dtype(at::kFloat));
  quantize_rows(x.data_ptr<T>(), m_rows, k, a.data_ptr<int8_t>(), xs.data_ptr<float>(),
                sx.data_ptr<float>());
  const int8_t* ap = a.data_ptr<int8_t>();
  const float* xsp = xs.data_ptr<float>();
  const float* sxp = sx.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  T* outp = out.data_ptr<T>();
  const bool tiles_here = amx_permitted();
  (void)tiles_here;  // unread where only the VNNI path is built
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> buffer(groups * kUnpacked + 2 * kRows * kTile * 4 + 64);
    uint8_t* codes = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
#if defined(Q4_AMX_TILES)
    if (tiles_here) {
      configure_tiles();
      int32_t* c_tiles = reinterpret_cast<int32_t*>(codes + groups * kUnpacked);
      for (int64_t t = begin; t < end; ++t) {
        unpack_tile(pp + t * groups * kPacked, groups, codes);
        const int64_t at = t * groups * kTile;
        tile_all_rows(ap, xsp, sxp, codes, sp + at, op + at, outp, m_rows, k, n, t, c_tiles);
      }
      _tile_release();
      return;
    }
#endif
#if defined(Q4_AMX_VNNI)
    // Rows in panels: every tile re-reads a panel's int8 activations, which must stay in
    // the core's L2 (512 rows of a 1536-input layer are 768 KB); a tile's codes are
    // unpacked again per panel, a small cost against the panel's multiplies.
    constexpr int64_t kPanel = 128;
    for (int64_t m0 = 0; m0 < m_rows; m0 += kPanel) {
      const int64_t rows = std::min(kPanel, m_rows - m0);
      for (int64_t t = begin; t < end; ++t) {
        unpack_tile(pp + t * groups * kPacked, groups, codes);
        const int64_t at = t * groups * kTile;
        vnni_tile_all_rows(ap + m0 * k, xsp + m0 * groups, sxp + m0 * groups, codes, sp + at,
                           op + at, outp + m0 * n, rows, k, n, t);
      }
    }
#endif
  });
}
#else
constexpr bool kBuilt = false;
bool amx_permitted() { return false; }
#endif

// Which instructions run the kernel here: "amx", "avx512_vnni", or "" (none: not available).
std::string q4_amx_isa() {
#if defined(Q4_AMX_TILES)
  if (amx_permitted()) return "amx";
#endif
#if defined(Q4_AMX_VNNI)
  return "avx512_vnni";
#else
  return "";
#endif
}

bool q4_amx_available() { return kBuilt && !q4_amx_isa().empty(); }

at::Tensor q4_amx_linear(const at::Tensor& x_in, const at::Tensor& packed_in,
                         const at::Tensor& scales_in, const at::Tensor& offsets_in) {
  TORCH_CHECK(q4_amx_available(), "q4_amx_linear: neither AMX int8 nor AVX-512 VNNI here");
  TORCH_CHECK(x_in.dim() == 2, "q4_amx_linear: x must be [M, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16,
              "q4_amx_linear: x must be float32 or bfloat16");
  TORCH_CHECK(packed_in.dim() == 3 && packed_in.size(2) == kPacked &&
                  packed_in.scalar_type() == at::kByte,
              "q4_amx_linear: packed must be uint8 [N/16, K/32, 256]");
  const int64_t m_rows = x_in.size(0), k = x_in.size(1), tiles = packed_in.size(0);
  const int64_t groups = k / kGroup;
  TORCH_CHECK(k % kGroup == 0 && packed_in.size(1) == groups,
              "q4_amx_linear: K must match, a multiple of 32");
  for (const at::Tensor* t : {&scales_in, &offsets_in}) {
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->size(0) == tiles &&
                    t->size(1) == groups && t->size(2) == kTile,
                "q4_amx_linear: scales and offsets must be float32 [N/16, K/32, 16]");
  }
  at::Tensor out = at::empty({m_rows, tiles * kTile}, x_in.options());
  if (m_rows == 0) return out;
#if defined(Q4_AMX_TILES) || defined(Q4_AMX_VNNI)
  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous();
  const at::Tensor scales = scales_in.contiguous(), offsets = offsets_in.contiguous();
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, packed, scales, offsets, out);
  } else {
    run<at::BFloat16>(x, packed, scales, offsets, out);
  }
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferos, m) {
  m.def("q4_amx_available() -> bool", &q4_amx_available);
  m.def("q4_amx_isa() -> str", &q4_amx_isa);
  m.def("q4_amx_linear(Tensor x, Tensor packed, Tensor scales, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(inferos, CPU, m) { m.impl("q4_amx_linear", &q4_amx_linear); }
