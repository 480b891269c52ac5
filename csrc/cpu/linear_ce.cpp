// CPU kernel of the fused cross-entropy rows: for each row of a float32 logits chunk [n, V], the
// log-sum-exp, the loss against its label and, in place, the gradient (softmax - onehot) * w_r.
// Three passes over a row (max, sum of exp, gradient) that stay in cache for the row's V floats;
// rows run in parallel. The GEMMs that make and consume the chunk are the caller's (torch's).
#include <cmath>
#include <cstdint>
#include <limits>

#include "../linear_ce.h"
#include "isa.h"

namespace fastft {
namespace {

// exp(x) for x <= 0 (softmax's x - max), branch-free so that the compiler vectorises the loops that
// call it: 2^(x log2 e) = 2^k * 2^f with k = round(x log2 e), |f| <= 1/2, and 2^f = e^(f ln 2) by its
// degree-7 Taylor polynomial (relative error < 1e-8 on |f ln 2| <= 0.35). Below -87 (where e^x is
// under float32's smallest normal) it returns e^-87 ~ 1.6e-38, which adds nothing to a row's sum.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;  // a NaN passes through and propagates
  const float t = x * 1.4426950408889634f;
  const float k = (t + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23 shifts the fraction out
  const float r = (t - k) * 0.6931471805599453f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

constexpr int kLanes = 16;  // independent accumulators: the reductions vectorise without reassociation flags

// One row: returns its loss; writes the gradient times w into x when write_grad.
__attribute__((always_inline)) inline float row_kernel(float* __restrict__ x, int64_t V, int64_t target, float w,
                                                       bool write_grad) {
  const int64_t body = V - V % kLanes;
  float lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < body; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = x[k + j] > lanes[j] ? x[k + j] : lanes[j];
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < kLanes; ++j) m = lanes[j] > m ? lanes[j] : m;
  for (int64_t k = body; k < V; ++k) m = x[k] > m ? x[k] : m;

  for (int j = 0; j < kLanes; ++j) lanes[j] = 0.0f;
  for (int64_t k = 0; k < body; k += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += exp_nonpos(x[k + j] - m);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += lanes[j];
  for (int64_t k = body; k < V; ++k) s += exp_nonpos(x[k] - m);

  const float lse = m + std::log(s);
  const float loss = lse - x[target];
  if (write_grad) {
    for (int64_t k = 0; k < V; ++k) x[k] = exp_nonpos(x[k] - lse) * w;
    x[target] -= w;
  }
  return loss;
}

using RowsFn = void (*)(float*, const int64_t*, const float*, float, int64_t, bool, float*, int64_t, int64_t,
                        int64_t);

__attribute__((always_inline)) inline void rows(float* x, const int64_t* labels, const float* row_scale, float scale,
                                                int64_t ignore_index, bool write_grad, float* loss, int64_t V,
                                                int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* xr = x + r * V;
    const int64_t t = labels[r];
    if (t == ignore_index) {
      loss[r] = 0.0f;
      if (write_grad)
        for (int64_t k = 0; k < V; ++k) xr[k] = 0.0f;
      continue;
    }
    const float w = row_scale == nullptr ? scale : scale * row_scale[r];
    loss[r] = row_kernel(xr, V, t, w, write_grad);
  }
}

void rows_generic(float* x, const int64_t* labels, const float* row_scale, float scale, int64_t ignore_index,
                  bool write_grad, float* loss, int64_t V, int64_t r0, int64_t r1) {
  rows(x, labels, row_scale, scale, ignore_index, write_grad, loss, V, r0, r1);
}

#ifdef FASTFT_CPU_DISPATCH
FASTFT_TARGET_AVX2 void rows_avx2(float* x, const int64_t* labels, const float* row_scale, float scale,
                                  int64_t ignore_index, bool write_grad, float* loss, int64_t V, int64_t r0,
                                  int64_t r1) {
  rows(x, labels, row_scale, scale, ignore_index, write_grad, loss, V, r0, r1);
}
FASTFT_TARGET_AVX512 void rows_avx512(float* x, const int64_t* labels, const float* row_scale, float scale,
                                      int64_t ignore_index, bool write_grad, float* loss, int64_t V, int64_t r0,
                                      int64_t r1) {
  rows(x, labels, row_scale, scale, ignore_index, write_grad, loss, V, r0, r1);
}
#endif

Tensor cross_entropy_rows_cpu(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& row_scale,
                              double scale, int64_t ignore_index, bool write_grad) {
  check_cross_entropy_rows(logits, labels, row_scale);
  const int64_t n = logits.size(0), V = logits.size(1);
  Tensor loss = empty_like_device(logits, {n});
  if (n == 0) return loss;
  STD_TORCH_CHECK(V > 0, "fastft.cross_entropy_rows_: the vocabulary is empty");
  const Tensor lab = as_contiguous(labels);
  const Tensor rs = row_scale.has_value() ? as_contiguous(*row_scale) : lab;  // lab: a placeholder, never read
  float* x = static_cast<float*>(logits.mutable_data_ptr());
  const int64_t* lp = static_cast<const int64_t*>(lab.const_data_ptr());
  const float* sp = row_scale.has_value() ? static_cast<const float*>(rs.const_data_ptr()) : nullptr;
  float* lo = static_cast<float*>(loss.mutable_data_ptr());
  RowsFn fn = &rows_generic;
#ifdef FASTFT_CPU_DISPATCH
  if (cpu_has_avx512())
    fn = &rows_avx512;
  else if (cpu_has_avx2())
    fn = &rows_avx2;
#endif
  const auto s = static_cast<float>(scale);
  const int64_t grain = std::max<int64_t>(1, 32768 / V);  // a row of a real vocabulary is work enough
  torch::stable::parallel_for(0, n, grain,
                   [&](int64_t r0, int64_t r1) { fn(x, lp, sp, s, ignore_index, write_grad, lo, V, r0, r1); });
  return loss;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastft, CPU, m) { m.impl("cross_entropy_rows_", TORCH_BOX(&cross_entropy_rows_cpu)); }

}  // namespace fastft
