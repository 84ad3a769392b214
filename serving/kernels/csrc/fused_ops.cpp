// The small per-layer ops of a Llama decoder layer, fused: at a decode step of a 135M model
// each of them moves a few KB, so what they cost is the dispatch of ~25 eager torch ops per
// layer (x 30 layers, every step), not arithmetic. Each op here replaces several:
//
//   rms_norm(x, w, eps)                 x.float() -> rms_norm -> .to(dtype) -> w * (4 ops)
//   add_rms_norm(x, residual, w, eps)   residual + x, then rms_norm of the sum (5 ops)
//   silu_and_mul(gate_up)               split -> silu(gate) -> * up (3 ops)
//   rope_qkv_write(qkv, cos, sin, ...)  split -> rotate q and k (HF rotate-half, 6 ops each)
//                                       -> write k and v into the paged cache (2 index_copy_)
//
// Rounding is eager torch's: every intermediate the eager ops would store in the model's
// dtype (bf16) is rounded to it here too, and products and sums of bf16 values are formed
// in fp32 as torch's kernels form them, so rotary, the residual sum and RMSNorm (whose
// statistic torch's own ops compute, `mean_of_squares`) are bit-identical to the eager
// path. silu's exp is a vectorized polynomial (exp_block) where torch uses Sleef's: the two
// may differ by an ulp or two.
//
// Rows are independent: a row's result never depends on the other rows of the batch (the
// mixed-step and speculative tests compare a sequence run alone and in a batch).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// Eager torch rounds every product before it adds (mul, mul, add are separate kernels);
// GCC would otherwise contract `a * b + c` into one FMA with a single rounding.
#pragma GCC optimize("fp-contract=off")

namespace {

// Values per parallel task: below this many, one thread does it all (waking an OpenMP team
// costs more than a few rows of 576 values), above it rows are split between threads.
constexpr int64_t kGrainValues = 16384;

inline int64_t grain_rows(int64_t values_per_row) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, values_per_row));
}

template <typename T>
inline float to_f(T v) {
  return static_cast<float>(v);
}

// What the eager op stores: the value rounded to T (a no-op for float).
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// The mean of squares of each row, `[rows, 1]` fp32, computed by torch's own ops exactly as
// `F.rms_norm` on fp32 input computes it (pow, then mean): a reduction in any other order
// moves the statistic by an ulp now and then, which moved perplexity under quantized KV by
// 0.2 %. Three ATen calls from C++ cost a fraction of the eager ops they stand for.
at::Tensor mean_of_squares(const at::Tensor& x) {
  return at::mean(at::pow(x.to(at::kFloat), 2), {-1}, /*keepdim=*/true);
}

template <typename T>
void rms_norm_rows(const T* x, const float* mean_sq, const T* w, T* out, int64_t rows, int64_t h,
                   float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * h;
    T* o = out + r * h;
    const float inv = 1.f / std::sqrt(mean_sq[r] + eps);  // torch's add_(eps), rsqrt
    for (int64_t i = 0; i < h; ++i) {
      // F.rms_norm in fp32, rounded to T by .to(dtype), then weight * normed in T
      const float normed = round_to<T>(to_f(xr[i]) * inv);
      o[i] = static_cast<T>(to_f(w[i]) * normed);
    }
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), op, ": contiguous tensors expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && x.size(1) == w.size(0), op,
              ": x [rows, hidden] and weight [hidden] expected");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x and weight must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16 expected");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, w, "rms_norm");
  at::Tensor out = at::empty_like(x);
  const at::Tensor mean_sq = mean_of_squares(x);
  const int64_t rows = x.size(0), h = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
      rms_norm_rows(xp + begin * h, mean_sq.data_ptr<float>() + begin, wp, op + begin * h,
                    end - begin, h, static_cast<float>(eps));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                               const at::Tensor& w, double eps) {
  check_rows(x, w, "add_rms_norm");
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must match x");
  at::Tensor sum = at::empty_like(x);
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), h = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    at::parallel_for(0, rows * h, kGrainValues, [&](int64_t begin, int64_t end) {
      // residual + x, as eager `x = x + attn(...)` stores it
      for (int64_t i = begin; i < end; ++i) {
        sp[i] = static_cast<scalar_t>(to_f(rp[i]) + to_f(xp[i]));
      }
    });
    const at::Tensor mean_sq = mean_of_squares(sum);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t begin, int64_t end) {
      rms_norm_rows(sp + begin * h, mean_sq.data_ptr<float>() + begin, wp, op + begin * h,
                    end - begin, h, static_cast<float>(eps));
    });
  });
  return {out, sum};
}

// exp(x) for a block of floats, in plain arithmetic GCC vectorizes at -march=native (a libm
// call per value does not vectorize: it made silu_and_mul 13 % of a 128-token prefill).
// The clamp's compares vectorize only with -fno-trapping-math (build.py's CFLAGS).
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-5 polynomial, 2^n put
// into the exponent bits; within 2 ulp of expf over the clamped range. Clamped to
// [-87, 88]: below, expf is denormal or 0, above it overflows; silu's quotient is the same
// to fp32 either way (x / (1 + e^88) and x / (1 + 0) round as with the exact values).
inline void exp_block(const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] < -87.f ? -87.f : x[i];
    v = v > 88.f ? 88.f : v;
    const float k = std::floor(v * 1.44269504088896341f + 0.5f);
    v = v - k * 0.693359375f;  // ln2 in two parts: the product with k stays exact
    v = v - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * v + 1.3981999507e-3f;
    p = p * v + 8.3334519073e-3f;
    p = p * v + 4.1665795894e-2f;
    p = p * v + 1.6666665459e-1f;
    p = p * v + 5.0000001201e-1f;
    p = p * v * v + v + 1.f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    out[i] = p * __builtin_bit_cast(float, bits);
  }
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "silu_and_mul: contiguous [rows, 2 * intermediate] expected");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_and_mul: float32 or bfloat16 expected");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  constexpr int64_t kBlock = 256;  // floats per pass: stays in L1 between the passes
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(3 * n), [&](int64_t begin, int64_t end) {
      float neg[kBlock], e[kBlock];
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = gp + r * 2 * n;
        const scalar_t* u = g + n;
        scalar_t* o = op + r * n;
        for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
          const int64_t len = std::min(kBlock, n - i0);
          for (int64_t j = 0; j < len; ++j) neg[j] = -to_f(g[i0 + j]);
          exp_block(neg, e, len);
          for (int64_t j = 0; j < len; ++j) {
            const float silu = round_to<scalar_t>(-neg[j] / (1.f + e[j]));  // F.silu in T
            o[i0 + j] = static_cast<scalar_t>(silu * to_f(u[i0 + j]));
          }
        }
      }
    });
  });
  return out;
}

// One head of `d` channels rotated HF's way (channel i pairs with i + d/2):
//   out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded to T.
template <typename T>
inline void rotate_head(const T* x, const T* cos, const T* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -to_f(x[i + half]) : to_f(x[i - half]);
    const float a = round_to<T>(to_f(x[i]) * to_f(cos[i]));
    const float b = round_to<T>(rotated * to_f(sin[i]));
    out[i] = static_cast<T>(a + b);
  }
}

template <typename T, typename C>
void rope_qkv_rows(const T* qkv, const T* cos, const T* sin, const int64_t* slots, C* cache_k,
                   C* cache_v, T* q_out, T* k_out, T* v_out, int64_t begin, int64_t end,
                   int64_t heads, int64_t kv_heads, int64_t d) {
  const int64_t width = (heads + 2 * kv_heads) * d;
  for (int64_t t = begin; t < end; ++t) {
    const T* row = qkv + t * width;
    const T* c = cos + t * d;
    const T* s = sin + t * d;
    for (int64_t h = 0; h < heads; ++h) {
      rotate_head(row + h * d, c, s, q_out + (t * heads + h) * d, d);
    }
    T* kt = k_out + t * kv_heads * d;
    T* vt = v_out + t * kv_heads * d;
    const T* krow = row + heads * d;
    const T* vrow = krow + kv_heads * d;
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate_head(krow + h * d, c, s, kt + h * d, d);
    }
    for (int64_t i = 0; i < kv_heads * d; ++i) vt[i] = vrow[i];
    // write_kv: k.to(cache dtype), v.to(cache dtype) at the token's slot
    C* kc = cache_k + slots[t] * kv_heads * d;
    C* vc = cache_v + slots[t] * kv_heads * d;
    for (int64_t i = 0; i < kv_heads * d; ++i) {
      kc[i] = static_cast<C>(to_f(kt[i]));
      vc[i] = static_cast<C>(to_f(vt[i]));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_qkv_write(
    const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& layer_cache, const at::Tensor& slot_mapping, int64_t heads,
    int64_t kv_heads) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.dim() == 2, "rope_qkv_write: contiguous qkv [T, W]");
  const int64_t tokens = qkv.size(0);
  TORCH_CHECK(qkv.size(1) % (heads + 2 * kv_heads) == 0, "rope_qkv_write: qkv width");
  const int64_t d = qkv.size(1) / (heads + 2 * kv_heads);
  TORCH_CHECK(d % 2 == 0, "rope_qkv_write: even head_dim expected");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == tokens * d &&
                  sin.numel() == tokens * d && cos.scalar_type() == qkv.scalar_type() &&
                  sin.scalar_type() == qkv.scalar_type(),
              "rope_qkv_write: cos/sin [T, 1, head_dim] in qkv's dtype expected");
  TORCH_CHECK(layer_cache.is_contiguous() && layer_cache.dim() == 5 && layer_cache.size(0) == 2 &&
                  layer_cache.size(3) == kv_heads && layer_cache.size(4) == d,
              "rope_qkv_write: layer_cache [2, blocks, block_size, kv_heads, head_dim] expected");
  TORCH_CHECK(slot_mapping.is_contiguous() && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.numel() == tokens,
              "rope_qkv_write: int64 slot_mapping [T] expected");
  const int64_t num_slots = layer_cache.size(1) * layer_cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "rope_qkv_write: slot out of range");
  }
  at::Tensor q = at::empty({tokens, heads, d}, qkv.options());
  at::Tensor k = at::empty({tokens, kv_heads, d}, qkv.options());
  at::Tensor v = at::empty({tokens, kv_heads, d}, qkv.options());
  const bool bf16 = qkv.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || qkv.scalar_type() == at::kFloat, "rope_qkv_write: float32 or bfloat16");
  const auto cache_type = layer_cache.scalar_type();
  TORCH_CHECK(cache_type == at::kFloat || cache_type == at::kBFloat16,
              "rope_qkv_write: float32 or bfloat16 cache expected");
  auto run = [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using C = decltype(c_tag);
    C* base = layer_cache.data_ptr<C>();
    C* cache_v = base + num_slots * kv_heads * d;
    at::parallel_for(0, tokens, grain_rows(2 * (heads + 2 * kv_heads) * d), [&](int64_t begin, int64_t end) {
      rope_qkv_rows<T, C>(qkv.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), slots, base,
                          cache_v, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), begin, end,
                          heads, kv_heads, d);
    });
  };
  if (bf16) {
    if (cache_type == at::kBFloat16) {
      run(c10::BFloat16(), c10::BFloat16());
    } else {
      run(c10::BFloat16(), float());
    }
  } else if (cache_type == at::kBFloat16) {
    run(float(), c10::BFloat16());
  } else {
    run(float(), float());
  }
  return {q, k, v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferos, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> "
      "(Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def(
      "rope_qkv_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) layer_cache, "
      "Tensor slot_mapping, int heads, int kv_heads) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(inferos, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_qkv_write", &rope_qkv_write);
}
