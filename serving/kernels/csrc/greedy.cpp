// Greedy sampling's argmax over each row of fp32 logits, vectorised.
//
// torch's argmax walks a row one value at a time (an index kept beside the running
// maximum): at a c=32 decode step of a 49152-token vocabulary it took 1.5-1.7 ms of a ~45 ms
// step. Here a row is read twice, both passes 16 lanes wide: its maximum, then the first
// index holding it (a row is 192 KB, still in L2 for the second pass).
//
// torch's semantics exactly: the first index of the maximum; a NaN counts as larger than
// everything (the first NaN wins); -0.0 and 0.0 are equal (the first of them wins); a row of
// -inf gives 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace {

using vfloat = float __attribute__((vector_size(64)));  // 16 lanes
using vint = int32_t __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline vfloat load16(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline bool any_lane(vint mask) {
  for (int i = 0; i < kLanes; ++i)
    if (mask[i]) return true;
  return false;
}

int64_t argmax_row(const float* row, int64_t n) {
  const int64_t body = n - n % kLanes;
  vfloat vmax = {};
  for (int i = 0; i < kLanes; ++i) vmax[i] = -std::numeric_limits<float>::infinity();
  vint has_nan = {};
  for (int64_t i = 0; i < body; i += kLanes) {
    const vfloat v = load16(row + i);
    has_nan |= (v != v);
    vmax = v > vmax ? v : vmax;
  }
  float m = -std::numeric_limits<float>::infinity();
  bool nan = any_lane(has_nan);
  for (int i = 0; i < kLanes; ++i) m = vmax[i] > m ? vmax[i] : m;
  for (int64_t i = body; i < n; ++i) {
    nan = nan || row[i] != row[i];
    m = row[i] > m ? row[i] : m;
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (row[i] != row[i]) return i;
  }
  for (int64_t i = 0; i < body; i += kLanes) {
    const vint hit = load16(row + i) == m;
    if (any_lane(hit)) {
      for (int j = 0; j < kLanes; ++j)
        if (hit[j]) return i + j;
    }
  }
  for (int64_t i = body; i < n; ++i)
    if (row[i] == m) return i;
  return 0;  // n == 0 is refused before; a row of -inf matched at its first index above
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "argmax_rows: contiguous float32 [rows, vocab] expected");
  const int64_t rows = logits.size(0);
  const int64_t n = logits.size(1);
  TORCH_CHECK(n > 0, "argmax_rows: empty rows");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* src = logits.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  // a row or more per task: below ~64K values one thread reads it faster than two wake
  const int64_t grain = std::max<int64_t>(1, 65536 / n);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dst[r] = argmax_row(src + r * n, n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(inferos, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(inferos, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
