// Decode attention over a paged KV cache, reading K/V through the block table.
//
// One call does one layer for every sequence of a decode step: one query token per
// sequence, `q [num_seqs, num_heads, head_dim]` over the first `context_lens[i]` tokens of
// `layer_cache [2, num_blocks, block_size, num_kv_heads, head_dim]` (K then V, token-major).
// Work items are (sequence, kv head); the `group` query heads sharing a kv head are done
// together, so each K/V row is read (and converted from bf16) once. Scores, softmax and the
// weighted sum of V are fp32 whatever the storage dtype. Threads come from torch's intra-op
// pool (at::parallel_for): a second OpenMP team of another size would spin against it.
//
// Two versions of the per-item loop: one on 16-float vectors (GCC/clang vector extensions,
// so AVX-512 where there is, two AVX2 halves elsewhere) for head_dim 64 or 128 and groups
// 1-4, with the group's queries and accumulators in registers; plain loops for the rest.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using vfloat = float __attribute__((vector_size(64)));  // 16 lanes
using vfloat8 = float __attribute__((vector_size(32)));
using vfloat4 = float __attribute__((vector_size(16)));
using vu16 = uint16_t __attribute__((vector_size(32)));
using vu32 = uint32_t __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline float load_one(float x) { return x; }

inline float load_one(c10::BFloat16 x) {
  // bf16 is the top half of an fp32: a shift the compiler vectorises
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store_one(float* dst, float x) { *dst = x; }
inline void store_one(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }

inline vfloat load16(const float* src) {
  vfloat v;
  std::memcpy(&v, src, sizeof(v));
  return v;
}

inline vfloat load16(const c10::BFloat16* src) {
  vu16 raw;
  std::memcpy(&raw, src, sizeof(raw));
  const vu32 bits = __builtin_convertvector(raw, vu32) << 16;
  vfloat v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline float hsum(vfloat v) {
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)  // GCC >= 12, clang
  const vfloat8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) +
                    __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
#else
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// exp(x) for the softmax's x <= 0, in plain arithmetic the compiler vectorises (libm's expf
// is a call per score). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
// for e^r (about 1 ulp), 2^n from the exponent bits; x below -87 (e^x < 2^-126, nothing
// beside the row maximum's 1) gives e^-87 rather than a denormal.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// Turns the first `len` scores of each of `group` rows (`stride` apart) into e^(s - max)
// in place; returns the row sums.
inline void softmax_numerators(float* scores, const float* row_max, float* row_sum,
                               int64_t group, int64_t len, int64_t stride) {
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * stride;
    const float m = row_max[g];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      sg[t] = exp_nonpositive(sg[t] - m);
      sum += sg[t];
    }
    row_sum[g] = sum;
  }
}

// Where one work item reads: token t of the sequence sits at
// k_base + (table[t / block_size] * block_size + t % block_size) * token_stride (V likewise).
template <typename C>
struct Item {
  const C* k_base;  // cache K + this kv head's offset
  const C* v_base;
  const int64_t* table;
  int64_t len;
  int64_t block_size;
  int64_t token_stride;
};

// Blocks sit anywhere in the pool, so the hardware prefetcher cannot run ahead of a jump
// to the next one: ask for the next block's rows of this head (K or V) while this block is
// computed: `row_elems` values of each of `n` tokens, `token_stride` values apart. At c=32
// (SmolLM2's 30 layers, contexts 96-192, bf16) the calls went 12.1 -> 8.0 ms with it.
template <typename C>
inline void prefetch_block(const C* first, int64_t n, int64_t token_stride, int64_t row_elems) {
  const int64_t row_bytes = row_elems * static_cast<int64_t>(sizeof(C));
  for (int64_t j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(first + j * token_stride);
    for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 3);
  }
}

// qf: the group's queries, fp32, pre-scaled, [group, head_dim]; out: fp32 [group, head_dim].
template <typename C, int G, int NC>
void item_vectorized(const Item<C>& it, const float* qf, float* scores, float* out) {
  vfloat qv[G][NC];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < NC; ++c) qv[g][c] = load16(qf + g * NC * kLanes + c * kLanes);
  float row_max[G];
  float row_sum[G];
  for (int g = 0; g < G; ++g) row_max[g] = -std::numeric_limits<float>::infinity();
  for (int64_t t0 = 0; t0 < it.len; t0 += it.block_size) {
    const int64_t base = it.table[t0 / it.block_size] * it.block_size * it.token_stride;
    const int64_t n = std::min(it.block_size, it.len - t0);
    if (t0 + it.block_size < it.len) {
      const int64_t next = it.table[t0 / it.block_size + 1] * it.block_size * it.token_stride;
      prefetch_block(it.k_base + next, std::min(it.block_size, it.len - t0 - it.block_size),
                     it.token_stride, NC * kLanes);
    } else {  // the last K block: the V pass starts at the first V block
      prefetch_block(it.v_base + it.table[0] * it.block_size * it.token_stride,
                     std::min(it.block_size, it.len), it.token_stride, NC * kLanes);
    }
    for (int64_t j = 0; j < n; ++j) {
      const C* kr = it.k_base + base + j * it.token_stride;
      vfloat kv[NC];
      for (int c = 0; c < NC; ++c) kv[c] = load16(kr + c * kLanes);
      for (int g = 0; g < G; ++g) {
        vfloat a = qv[g][0] * kv[0];
        for (int c = 1; c < NC; ++c) a += qv[g][c] * kv[c];
        const float s = hsum(a);
        scores[g * it.len + t0 + j] = s;
        row_max[g] = std::max(row_max[g], s);
      }
    }
  }
  softmax_numerators(scores, row_max, row_sum, G, it.len, it.len);
  vfloat acc[G][NC] = {};
  for (int64_t t0 = 0; t0 < it.len; t0 += it.block_size) {
    const int64_t base = it.table[t0 / it.block_size] * it.block_size * it.token_stride;
    const int64_t n = std::min(it.block_size, it.len - t0);
    if (t0 + it.block_size < it.len) {
      const int64_t next = it.table[t0 / it.block_size + 1] * it.block_size * it.token_stride;
      prefetch_block(it.v_base + next, std::min(it.block_size, it.len - t0 - it.block_size),
                     it.token_stride, NC * kLanes);
    }
    for (int64_t j = 0; j < n; ++j) {
      const C* vr = it.v_base + base + j * it.token_stride;
      vfloat vv[NC];
      for (int c = 0; c < NC; ++c) vv[c] = load16(vr + c * kLanes);
      for (int g = 0; g < G; ++g) {
        const float p = scores[g * it.len + t0 + j];
        for (int c = 0; c < NC; ++c) acc[g][c] += p * vv[c];
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inv = 1.f / row_sum[g];
    for (int c = 0; c < NC; ++c) {
      const vfloat o = acc[g][c] * inv;
      std::memcpy(out + g * NC * kLanes + c * kLanes, &o, sizeof(o));
    }
  }
}

// Any head_dim and group: the same passes in plain loops.
template <typename C>
void item_generic(const Item<C>& it, const float* qf, float* scores, float* out, int64_t group,
                  int64_t d) {
  std::vector<float> row(static_cast<size_t>(d));
  std::vector<float> row_max(static_cast<size_t>(group),
                             -std::numeric_limits<float>::infinity());
  std::vector<float> row_sum(static_cast<size_t>(group));
  for (int64_t t = 0; t < it.len; ++t) {
    const C* kr = it.k_base + (it.table[t / it.block_size] * it.block_size + t % it.block_size) *
                                  it.token_stride;
    for (int64_t i = 0; i < d; ++i) row[i] = load_one(kr[i]);
    for (int64_t g = 0; g < group; ++g) {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < d; ++i) s += qf[g * d + i] * row[i];
      scores[g * it.len + t] = s;
      row_max[g] = std::max(row_max[g], s);
    }
  }
  softmax_numerators(scores, row_max.data(), row_sum.data(), group, it.len, it.len);
  std::fill(out, out + group * d, 0.f);
  for (int64_t t = 0; t < it.len; ++t) {
    const C* vr = it.v_base + (it.table[t / it.block_size] * it.block_size + t % it.block_size) *
                                  it.token_stride;
    for (int64_t i = 0; i < d; ++i) row[i] = load_one(vr[i]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * it.len + t];
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) out[g * d + i] += p * row[i];
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = 1.f / row_sum[g];
    for (int64_t i = 0; i < d; ++i) out[g * d + i] *= inv;
  }
}

template <typename C>
using ItemFn = void (*)(const Item<C>&, const float*, float*, float*);

template <typename C, int NC>
ItemFn<C> pick_group(int64_t group) {
  switch (group) {
    case 1: return &item_vectorized<C, 1, NC>;
    case 2: return &item_vectorized<C, 2, NC>;
    case 3: return &item_vectorized<C, 3, NC>;
    case 4: return &item_vectorized<C, 4, NC>;
    default: return nullptr;
  }
}

template <typename C>
ItemFn<C> pick(int64_t group, int64_t d) {
  if (d == 64) return pick_group<C, 4>(group);
  if (d == 128) return pick_group<C, 8>(group);
  return nullptr;
}

template <typename Q, typename C>
void decode_kernel(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                   const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t num_seqs = q.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t num_blocks = cache.size(1);
  const int64_t block_size = cache.size(2);
  const int64_t num_kv_heads = cache.size(3);
  const int64_t d = cache.size(4);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t token_stride = num_kv_heads * d;  // one token's row of every kv head
  const int64_t v_offset = num_blocks * block_size * token_stride;

  const Q* q_ptr = q.data_ptr<Q>();
  const C* k_ptr = cache.data_ptr<C>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  Q* out_ptr = out.data_ptr<Q>();

  int64_t max_len = 0;
  int64_t total_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = lens[s];
    TORCH_CHECK(len >= 0 && len <= max_blocks * block_size, "paged_decode_attention: context ",
                len, " of sequence ", s, " does not fit its block table of ", max_blocks,
                " blocks");
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
      const int64_t id = tables[s * max_blocks + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_decode_attention: block id ", id,
                  " out of range [0, ", num_blocks, ")");
    }
    max_len = std::max(max_len, len);
    total_len += len;
  }

  const ItemFn<C> fast = pick<C>(group, d);
  // Below this many (token, kv head) rows in all, waking the second thread costs more than it
  // saves (decode at batch 1 over a short context).
  constexpr int64_t kParallelRows = 1024;
  const int64_t items = num_seqs * num_kv_heads;
  const int64_t grain = total_len * num_kv_heads < kParallelRows ? items : 1;

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(group * std::max<int64_t>(max_len, 1)));
    std::vector<float> qf(static_cast<size_t>(group * d));
    std::vector<float> of(static_cast<size_t>(group * d));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads;
      const int64_t h = item % num_kv_heads;
      const Q* q_rows = q_ptr + (s * num_heads + h * group) * d;
      Q* o_rows = out_ptr + (s * num_heads + h * group) * d;
      const Item<C> it{k_ptr + h * d,        k_ptr + v_offset + h * d, tables + s * max_blocks,
                       lens[s],              block_size,               token_stride};
      if (it.len == 0) {  // nothing to attend to: zeros rather than 0/0
        for (int64_t i = 0; i < group * d; ++i) store_one(o_rows + i, 0.f);
        continue;
      }
      const float sc = static_cast<float>(scale);
      for (int64_t i = 0; i < group * d; ++i) qf[i] = load_one(q_rows[i]) * sc;
      if (fast != nullptr) {
        fast(it, qf.data(), scores.data(), of.data());
      } else {
        item_generic(it, qf.data(), scores.data(), of.data(), group, d);
      }
      for (int64_t i = 0; i < group * d; ++i) store_one(o_rows + i, of[i]);
    }
  });
}

template <typename Q>
void dispatch_cache(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                    const at::Tensor& context_lens, double scale, at::Tensor& out) {
  if (cache.scalar_type() == at::kFloat) {
    decode_kernel<Q, float>(q, cache, block_tables, context_lens, scale, out);
  } else {
    decode_kernel<Q, c10::BFloat16>(q, cache, block_tables, context_lens, scale, out);
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& block_tables,
                  const at::Tensor& context_lens) {
  TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [num_seqs, num_heads, head_dim]");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2,
              "paged_decode_attention: layer_cache must be "
              "[2, num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(cache.is_contiguous(), "paged_decode_attention: layer_cache must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "paged_decode_attention: q must be float32 or bfloat16");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16,
              "paged_decode_attention: layer_cache must be float32 or bfloat16");
  TORCH_CHECK(q.size(2) == cache.size(4), "paged_decode_attention: head_dim of q and cache differ");
  TORCH_CHECK(cache.size(3) > 0 && q.size(1) % cache.size(3) == 0,
              "paged_decode_attention: num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  block_tables.scalar_type() == at::kLong,
              "paged_decode_attention: block_tables must be int64 [num_seqs, max_blocks]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == q.size(0) &&
                  context_lens.scalar_type() == at::kLong,
              "paged_decode_attention: context_lens must be int64 [num_seqs]");
}

at::Tensor paged_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& cache,
                                      const at::Tensor& block_tables_in,
                                      const at::Tensor& context_lens_in, double scale) {
  check_inputs(q_in, cache, block_tables_in, context_lens_in);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor block_tables = block_tables_in.contiguous();
  const at::Tensor context_lens = context_lens_in.contiguous();
  at::Tensor out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    dispatch_cache<float>(q, cache, block_tables, context_lens, scale, out);
  } else {
    dispatch_cache<c10::BFloat16>(q, cache, block_tables, context_lens, scale, out);
  }
  return out;
}

// Shapes only, for tracing into a compiled graph.
at::Tensor paged_decode_attention_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, double) {
  return at::empty_like(q);
}


// ---- staged contexts: L0 blocks in the cache plus INT8/INT4 units -------------------------
//
// The semantics of serving/models/staged_attention.py: each row's context is its valid L0
// tokens (`l0_tables [B, N0]`, `l0_valid [B, N0 * block_size]`) and, per pool, its valid
// units (`unit_valid [B, U]`), whose fields come selected for this step and layer as
// `[B * U, ...]` (row-major over (row, unit)): keys `codes * s + z` with (s, z) per channel
// (`k_scale [B*U, 1, H, D]`), values with (s, z) per token and head or per token
// (`v_scale [B*U, T, H|1, 1]`), fp16; codes packed `8 / bits` per byte along head_dim, code i
// of a byte at bit offset i * bits. All scores are softmaxed together. Plain loops: codes are
// converted to floats row by row, the key scale folded into the query.

struct Pool {
  const uint8_t* k_codes;
  const c10::Half* k_scale;
  const c10::Half* k_zero;
  const uint8_t* v_codes;
  const c10::Half* v_scale;
  const c10::Half* v_zero;
  const bool* valid;  // [B, U]
  int64_t units;      // U
  int64_t tokens;     // T
  int64_t v_heads;    // H or 1
  int k_bits;
  int v_bits;
};

inline void unpack_row(const uint8_t* src, int bits, int64_t d, float* dst) {
  if (bits == 8) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
    return;
  }
  const int per_byte = 8 / bits;
  const unsigned mask = (1u << bits) - 1;
  for (int64_t m = 0; m < d / per_byte; ++m) {
    const unsigned byte = src[m];
    for (int i = 0; i < per_byte; ++i) dst[m * per_byte + i] = static_cast<float>((byte >> (bits * i)) & mask);
  }
}

template <typename Q, typename C>
void staged_kernel(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& l0_tables,
                   const at::Tensor& l0_valid, const std::vector<Pool>& pools, double scale,
                   at::Tensor& out) {
  const int64_t num_seqs = q.size(0);
  const int64_t num_heads = q.size(1);
  const int64_t block_size = cache.size(2);
  const int64_t num_kv_heads = cache.size(3);
  const int64_t d = cache.size(4);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t n0 = l0_tables.size(1);
  const int64_t token_stride = num_kv_heads * d;
  const int64_t v_offset = cache.size(1) * block_size * token_stride;
  int64_t max_len = n0 * block_size;
  for (const Pool& p : pools) max_len += p.units * p.tokens;

  const Q* q_ptr = q.data_ptr<Q>();
  const C* k_ptr = cache.data_ptr<C>();
  const int64_t* tables = l0_tables.data_ptr<int64_t>();
  const bool* l0_ok = l0_valid.data_ptr<bool>();
  Q* out_ptr = out.data_ptr<Q>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(group * std::max<int64_t>(max_len, 1)));
    std::vector<float> qf(static_cast<size_t>(group * d));
    std::vector<float> qs(static_cast<size_t>(group * d));  // query times a unit's key scale
    std::vector<float> acc(static_cast<size_t>(group * d));
    std::vector<float> row(static_cast<size_t>(d));
    std::vector<float> qz(static_cast<size_t>(group));
    std::vector<float> pz(static_cast<size_t>(group));  // sum of p * value zero
    std::vector<float> row_max(static_cast<size_t>(group));
    std::vector<float> row_sum(static_cast<size_t>(group));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / num_kv_heads;
      const int64_t h = item % num_kv_heads;
      const Q* q_rows = q_ptr + (s * num_heads + h * group) * d;
      Q* o_rows = out_ptr + (s * num_heads + h * group) * d;
      for (int64_t i = 0; i < group * d; ++i) qf[i] = load_one(q_rows[i]) * sc;
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      // pass 1: scores of every valid token, in a fixed order pass 2 repeats
      int64_t len = 0;
      auto add_score = [&](int64_t g, float value) {
        scores[g * max_len + len] = value;
        row_max[g] = std::max(row_max[g], value);
      };
      for (int64_t b = 0; b < n0; ++b) {
        const C* base = k_ptr + tables[s * n0 + b] * block_size * token_stride + h * d;
        for (int64_t j = 0; j < block_size; ++j) {
          if (!l0_ok[(s * n0 + b) * block_size + j]) continue;
          const C* kr = base + j * token_stride;
          for (int64_t i = 0; i < d; ++i) row[i] = load_one(kr[i]);
          for (int64_t g = 0; g < group; ++g) {
            float v = 0.f;
#pragma omp simd reduction(+ : v)
            for (int64_t i = 0; i < d; ++i) v += qf[g * d + i] * row[i];
            add_score(g, v);
          }
          ++len;
        }
      }
      for (const Pool& p : pools) {
        const int64_t k_row = d * p.k_bits / 8;
        for (int64_t u = 0; u < p.units; ++u) {
          if (!p.valid[s * p.units + u]) continue;
          const int64_t unit = s * p.units + u;
          const c10::Half* ks = p.k_scale + (unit * num_kv_heads + h) * d;
          const c10::Half* kz = p.k_zero + (unit * num_kv_heads + h) * d;
          for (int64_t g = 0; g < group; ++g) {
            float z = 0.f;
            for (int64_t i = 0; i < d; ++i) {
              qs[g * d + i] = qf[g * d + i] * static_cast<float>(ks[i]);
              z += qf[g * d + i] * static_cast<float>(kz[i]);
            }
            qz[g] = z;
          }
          for (int64_t t = 0; t < p.tokens; ++t) {
            unpack_row(p.k_codes + ((unit * p.tokens + t) * num_kv_heads + h) * k_row, p.k_bits,
                       d, row.data());
            for (int64_t g = 0; g < group; ++g) {
              float v = 0.f;
#pragma omp simd reduction(+ : v)
              for (int64_t i = 0; i < d; ++i) v += qs[g * d + i] * row[i];
              add_score(g, v + qz[g]);
            }
            ++len;
          }
        }
      }
      // rows' scores sit max_len apart here
      softmax_numerators(scores.data(), row_max.data(), row_sum.data(), group, len, max_len);
      // pass 2: the same tokens in the same order, weighted values
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(pz.begin(), pz.end(), 0.f);
      int64_t t_all = 0;
      for (int64_t b = 0; b < n0; ++b) {
        const C* base =
            k_ptr + v_offset + tables[s * n0 + b] * block_size * token_stride + h * d;
        for (int64_t j = 0; j < block_size; ++j) {
          if (!l0_ok[(s * n0 + b) * block_size + j]) continue;
          const C* vr = base + j * token_stride;
          for (int64_t i = 0; i < d; ++i) row[i] = load_one(vr[i]);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * max_len + t_all];
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) acc[g * d + i] += p * row[i];
          }
          ++t_all;
        }
      }
      for (const Pool& p : pools) {
        const int64_t v_row = d * p.v_bits / 8;
        for (int64_t u = 0; u < p.units; ++u) {
          if (!p.valid[s * p.units + u]) continue;
          const int64_t unit = s * p.units + u;
          for (int64_t t = 0; t < p.tokens; ++t) {
            const int64_t at_scale = (unit * p.tokens + t) * p.v_heads + (p.v_heads > 1 ? h : 0);
            const float vs = static_cast<float>(p.v_scale[at_scale]);
            const float vz = static_cast<float>(p.v_zero[at_scale]);
            unpack_row(p.v_codes + ((unit * p.tokens + t) * num_kv_heads + h) * v_row, p.v_bits,
                       d, row.data());
            for (int64_t g = 0; g < group; ++g) {
              const float prob = scores[g * max_len + t_all];
              const float ps = prob * vs;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) acc[g * d + i] += ps * row[i];
              pz[g] += prob * vz;
            }
            ++t_all;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / row_sum[g];
        for (int64_t i = 0; i < d; ++i) {
          store_one(o_rows + g * d + i, (acc[g * d + i] + pz[g]) * inv);
        }
      }
    }
  });
}

at::Tensor paged_decode_attention_staged_cpu(
    const at::Tensor& q_in, const at::Tensor& cache, const at::Tensor& l0_tables_in,
    const at::Tensor& l0_valid_in, at::TensorList k_codes, at::TensorList k_scale,
    at::TensorList k_zero, at::TensorList v_codes, at::TensorList v_scale, at::TensorList v_zero,
    at::TensorList unit_valid, at::IntArrayRef k_bits, at::IntArrayRef v_bits, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2 && cache.is_contiguous(),
              "paged_decode_attention_staged: q [B, Hq, D], contiguous layer_cache "
              "[2, num_blocks, block_size, Hkv, D]");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16,
              "paged_decode_attention_staged: q must be float32 or bfloat16");
  TORCH_CHECK(cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16,
              "paged_decode_attention_staged: layer_cache must be float32 or bfloat16");
  const int64_t batch = q_in.size(0);
  const int64_t heads = cache.size(3);
  const int64_t d = cache.size(4);
  TORCH_CHECK(q_in.size(2) == d && q_in.size(1) % heads == 0,
              "paged_decode_attention_staged: q does not match the cache's heads");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor l0_tables = l0_tables_in.contiguous();
  const at::Tensor l0_valid = l0_valid_in.contiguous();
  TORCH_CHECK(l0_tables.dim() == 2 && l0_tables.size(0) == batch &&
                  l0_tables.scalar_type() == at::kLong,
              "paged_decode_attention_staged: l0_tables must be int64 [B, N0]");
  TORCH_CHECK(l0_valid.scalar_type() == at::kBool &&
                  l0_valid.numel() == batch * l0_tables.size(1) * cache.size(2),
              "paged_decode_attention_staged: l0_valid must be bool [B, N0 * block_size]");
  const int64_t* tables = l0_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < l0_tables.numel(); ++i) {
    TORCH_CHECK(tables[i] >= 0 && tables[i] < cache.size(1),
                "paged_decode_attention_staged: block id ", tables[i], " out of range");
  }
  const size_t n = unit_valid.size();
  TORCH_CHECK(k_codes.size() == n && k_scale.size() == n && k_zero.size() == n &&
                  v_codes.size() == n && v_scale.size() == n && v_zero.size() == n &&
                  k_bits.size() == n && v_bits.size() == n,
              "paged_decode_attention_staged: one entry per pool in every list");
  std::vector<at::Tensor> keep;  // contiguous copies live until the kernel is done
  std::vector<Pool> pools;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor valid = unit_valid[i].contiguous();
    TORCH_CHECK(valid.scalar_type() == at::kBool && valid.dim() == 2 && valid.size(0) == batch,
                "paged_decode_attention_staged: unit_valid must be bool [B, U]");
    const int64_t units = valid.size(1);
    const int kb = static_cast<int>(k_bits[i]);
    const int vb = static_cast<int>(v_bits[i]);
    TORCH_CHECK((kb == 8 || kb == 4 || kb == 2) && (vb == 8 || vb == 4 || vb == 2) &&
                    d % (8 / std::min(kb, vb)) == 0,
                "paged_decode_attention_staged: bits must be 8, 4 or 2");
    const at::Tensor kc = k_codes[i].contiguous(), ks = k_scale[i].contiguous(),
                     kz = k_zero[i].contiguous(), vc = v_codes[i].contiguous(),
                     vs = v_scale[i].contiguous(), vz = v_zero[i].contiguous();
    const int64_t tokens = kc.dim() == 4 ? kc.size(1) : 0;
    TORCH_CHECK(kc.scalar_type() == at::kByte && vc.scalar_type() == at::kByte &&
                    kc.dim() == 4 && kc.size(0) == batch * units && kc.size(2) == heads &&
                    kc.size(3) == d * kb / 8 && vc.sizes() == at::IntArrayRef({batch * units,
                    tokens, heads, d * vb / 8}),
                "paged_decode_attention_staged: codes must be uint8 [B*U, T, H, D*bits/8]");
    TORCH_CHECK(ks.scalar_type() == at::kHalf && kz.scalar_type() == at::kHalf &&
                    ks.numel() == batch * units * heads * d && kz.numel() == ks.numel(),
                "paged_decode_attention_staged: key scale/zero must be fp16 [B*U, 1, H, D]");
    TORCH_CHECK(vs.scalar_type() == at::kHalf && vz.scalar_type() == at::kHalf &&
                    vs.dim() == 4 && vs.size(0) == batch * units && vs.size(1) == tokens &&
                    (vs.size(2) == heads || vs.size(2) == 1) && vs.size(3) == 1 &&
                    vz.sizes() == vs.sizes(),
                "paged_decode_attention_staged: value scale/zero must be fp16 [B*U, T, H|1, 1]");
    pools.push_back(Pool{kc.data_ptr<uint8_t>(), ks.data_ptr<c10::Half>(),
                         kz.data_ptr<c10::Half>(), vc.data_ptr<uint8_t>(),
                         vs.data_ptr<c10::Half>(), vz.data_ptr<c10::Half>(),
                         valid.data_ptr<bool>(), units, tokens, vs.size(2), kb, vb});
    keep.insert(keep.end(), {valid, kc, ks, kz, vc, vs, vz});
  }
  at::Tensor out = at::empty_like(q);
  if (batch == 0) return out;
  if (q.scalar_type() == at::kFloat) {
    if (cache.scalar_type() == at::kFloat) {
      staged_kernel<float, float>(q, cache, l0_tables, l0_valid, pools, scale, out);
    } else {
      staged_kernel<float, c10::BFloat16>(q, cache, l0_tables, l0_valid, pools, scale, out);
    }
  } else if (cache.scalar_type() == at::kFloat) {
    staged_kernel<c10::BFloat16, float>(q, cache, l0_tables, l0_valid, pools, scale, out);
  } else {
    staged_kernel<c10::BFloat16, c10::BFloat16>(q, cache, l0_tables, l0_valid, pools, scale, out);
  }
  return out;
}

at::Tensor paged_decode_attention_staged_meta(
    const at::Tensor& q, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList,
    at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
    at::TensorList, at::IntArrayRef, at::IntArrayRef, double) {
  return at::empty_like(q);
}

}  // namespace

// A fragment: other kernels of csrc/ (each its own .so) add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(inferos, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor layer_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
  m.def(
      "paged_decode_attention_staged(Tensor q, Tensor layer_cache, Tensor l0_tables, "
      "Tensor l0_valid, Tensor[] k_codes, Tensor[] k_scale, Tensor[] k_zero, Tensor[] v_codes, "
      "Tensor[] v_scale, Tensor[] v_zero, Tensor[] unit_valid, int[] k_bits, int[] v_bits, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(inferos, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cpu);
  m.impl("paged_decode_attention_staged", &paged_decode_attention_staged_cpu);
}

TORCH_LIBRARY_IMPL(inferos, Meta, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_meta);
  m.impl("paged_decode_attention_staged", &paged_decode_attention_staged_meta);
}
