// CUDA kernel of the fused cross-entropy over rows of float32 logits: the per-row loss and, in place,
// the gradient (softmax - onehot) * w_r.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../linear_ce.h"
#include "runtime.cuh"
#include "vec.cuh"

namespace fastft {
namespace cuda {
namespace {

constexpr int kVec = 4;     // floats per 16-byte access
constexpr int kUnroll = 4;  // vectors in flight per thread per loop step

// Running (max, sum of exp(x - shift(max))) of a set of logits. shift(m) is m, or 0 when m is infinite,
// as in torch.logsumexp: a row with +inf gives lse = +inf (not nan), an all -inf row lse = -inf.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ float shift_of(float m) { return isinf(m) ? 0.f : m; }

// s rescaled from the shift of m to the shift of m_new >= m. s == 0 (nothing but -inf seen) stays 0
// however far m_new is (0 * inf would be nan); a nan s stays nan, so one nan logit makes the row nan.
__device__ __forceinline__ float rescaled(float s, float m, float m_new) {
  return s == 0.f ? 0.f : s * __expf(shift_of(m) - shift_of(m_new));
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  return {m, rescaled(a.s, a.m, m) + rescaled(b.s, b.m, m)};
}

// Adds K logits to acc. fmaxf drops a nan from the max, but exp(nan - shift) carries it into the sum.
template <int K>
__device__ __forceinline__ void accumulate(MaxSum& acc, const float (&x)[K]) {
  float m = acc.m;
#pragma unroll
  for (int k = 0; k < K; ++k) m = fmaxf(m, x[k]);
  float s = m > acc.m ? rescaled(acc.s, acc.m, m) : acc.s;
  const float sh = shift_of(m);
#pragma unroll
  for (int k = 0; k < K; ++k) s += __expf(x[k] - sh);
  acc = {m, s};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum b{__shfl_xor_sync(0xffffffffu, a.m, offset), __shfl_xor_sync(0xffffffffu, a.s, offset)};
    a = combine(a, b);
  }
  return a;
}

// NOTE [row layout]: ROW_THREADS threads (threadIdx.x) share one row; a block holds ROWS rows
// (threadIdx.y) and walks rows blockIdx.x * ROWS + y, then + gridDim.x * ROWS, ... Rows start at
// r * V (64-bit): with any V a row's start need not be 16-byte aligned, so each row is split into
// a scalar head up to the first 16-byte boundary, 16-byte vectors, and a scalar tail (NOTE [alignment]
// in vec.cuh holds for the vectors: their base is aligned by construction). Both passes give each
// element to the same thread, so a thread overwrites only logits it read itself; the only logit read
// across threads is the target's (by threadIdx.x == 0, before the row's barrier).
//
// Pass 1: online (max, sum) per thread, reduced over the row (warp shuffles, then shared memory across
// warps). Pass 2 (write_grad): logits[r, k] = exp(x - shift) * (w / sum) - w * (k == label).
template <int ROW_THREADS, int ROWS>
__global__ void __launch_bounds__(ROW_THREADS* ROWS)
    cross_entropy_rows_kernel(float* __restrict__ logits, const int64_t* __restrict__ labels,
                              const float* __restrict__ row_scale, float scale, int64_t ignore_index, bool write_grad,
                              int64_t n, int64_t V, float* __restrict__ loss) {
  static_assert(ROW_THREADS % 32 == 0 && (ROWS == 1 || ROW_THREADS == 32), "a row is one warp or one block");
  constexpr int kWarps = ROW_THREADS / 32;
  __shared__ MaxSum s_warp[kWarps > 1 ? kWarps : 1];
  const int tid = threadIdx.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.y; r < n;
       r += static_cast<int64_t>(gridDim.x) * ROWS) {
    float* x = logits + r * V;
    const int64_t label = labels[r];
    // Elements before the first 16-byte boundary of the row, then whole vectors, then the tail.
    const int64_t head = std::min<int64_t>(
        V, static_cast<int64_t>((kVec - (reinterpret_cast<uintptr_t>(x) / sizeof(float)) % kVec) % kVec));
    float* body = x + head;
    const int64_t nvec = (V - head) / kVec;
    const int64_t tail = head + nvec * kVec;

    if (label == ignore_index) {  // uniform over the row's threads: no barrier is skipped by some only
      if (tid == 0) loss[r] = 0.f;
      if (!write_grad) continue;
      for (int64_t k = tid; k < head; k += ROW_THREADS) x[k] = 0.f;
      const Vec<float, kVec> zero{};
      for (int64_t i = tid; i < nvec; i += ROW_THREADS) store_vec(body, zero, i);
      for (int64_t k = tail + tid; k < V; k += ROW_THREADS) x[k] = 0.f;
      continue;
    }
    CUDA_KERNEL_ASSERT(label >= 0 && label < V);
    const float target = tid == 0 ? x[label] : 0.f;

    MaxSum acc{-INFINITY, 0.f};
    for (int64_t k = tid; k < head; k += ROW_THREADS) accumulate<1>(acc, {x[k]});
    int64_t i = tid;
    for (; i + (kUnroll - 1) * ROW_THREADS < nvec; i += kUnroll * ROW_THREADS) {
      Vec<float, kVec> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec<float, kVec>(body, i + u * ROW_THREADS);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) accumulate<kVec>(acc, v[u].val);
    }
    for (; i < nvec; i += ROW_THREADS) accumulate<kVec>(acc, load_vec<float, kVec>(body, i).val);
    for (int64_t k = tail + tid; k < V; k += ROW_THREADS) accumulate<1>(acc, {x[k]});

    acc = warp_reduce(acc);
    if constexpr (kWarps > 1) {
      if (tid % 32 == 0) s_warp[tid / 32] = acc;
      __syncthreads();
      acc = s_warp[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) acc = combine(acc, s_warp[w]);
      __syncthreads();  // s_warp is read by all before the next row writes it
    } else {
      __syncwarp();  // orders the target's read (lane 0) before the other lanes' gradient stores
    }

    const float sh = shift_of(acc.m);
    if (tid == 0) loss[r] = sh + logf(acc.s) - target;
    if (!write_grad) continue;

    const float w = row_scale == nullptr ? scale : scale * row_scale[r];
    const float ws = w / acc.s;
    auto grad = [&](float xk, int64_t k) { return __expf(xk - sh) * ws - (k == label ? w : 0.f); };
    for (int64_t k = tid; k < head; k += ROW_THREADS) x[k] = grad(x[k], k);
    i = tid;
    for (; i + (kUnroll - 1) * ROW_THREADS < nvec; i += kUnroll * ROW_THREADS) {
      Vec<float, kVec> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_vec<float, kVec>(body, i + u * ROW_THREADS);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t k0 = head + (i + u * ROW_THREADS) * kVec;
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[u].val[j] = grad(v[u].val[j], k0 + j);
        store_vec(body, v[u], i + u * ROW_THREADS);
      }
    }
    for (; i < nvec; i += ROW_THREADS) {
      auto v = load_vec<float, kVec>(body, i);
      const int64_t k0 = head + i * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) v.val[j] = grad(v.val[j], k0 + j);
      store_vec(body, v, i);
    }
    for (int64_t k = tail + tid; k < V; k += ROW_THREADS) x[k] = grad(x[k], k);
  }
}

Tensor cross_entropy_rows_cuda(const Tensor& logits, const Tensor& labels_, const std::optional<Tensor>& row_scale_,
                               double scale, int64_t ignore_index, bool write_grad) {
  check_cross_entropy_rows(logits, labels_, row_scale_);
  const auto guard = device_guard(logits);
  const int64_t n = logits.size(0), V = logits.size(1);
  Tensor loss = empty_like_device(logits, {n});
  if (n == 0) return loss;
  const Tensor labels = as_contiguous(labels_);
  const Tensor row_scale = row_scale_.has_value() ? as_contiguous(*row_scale_) : labels;  // labels: never read
  const float* rs = row_scale_.has_value() ? static_cast<const float*>(row_scale.const_data_ptr()) : nullptr;
  const cudaStream_t stream = current_stream(logits);
  auto launch = [&](auto row_threads_tag, auto rows_tag) {
    constexpr int RT = decltype(row_threads_tag)::value, ROWS = decltype(rows_tag)::value;
    const int64_t blocks = std::min<int64_t>((n + ROWS - 1) / ROWS, int64_t{1} << 30);
    cross_entropy_rows_kernel<RT, ROWS><<<static_cast<unsigned>(blocks), dim3(RT, ROWS), 0, stream>>>(
        static_cast<float*>(logits.mutable_data_ptr()), static_cast<const int64_t*>(labels.const_data_ptr()), rs,
        static_cast<float>(scale), ignore_index, write_grad, n, V, static_cast<float*>(loss.mutable_data_ptr()));
    check_launch("cross_entropy_rows_kernel");
  };
  // Small vocabularies: a warp per row, 8 rows per block; otherwise a block per row, wide enough that
  // each thread has a few dozen vectors at most (V = 128256: 512 threads, ~63 vectors each).
  if (V <= 2048)
    launch(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{});
  else if (V <= 16384)
    launch(std::integral_constant<int, 128>{}, std::integral_constant<int, 1>{});
  else
    launch(std::integral_constant<int, 512>{}, std::integral_constant<int, 1>{});
  return loss;
}

}  // namespace
}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(fastft, CUDA, m) { m.impl("cross_entropy_rows_", TORCH_BOX(&cuda::cross_entropy_rows_cuda)); }

}  // namespace fastft
