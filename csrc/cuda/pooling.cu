// CUDA kernels of masked pooling: forward (mean, max, cls, last) and the fused backward.
#include <algorithm>
#include <type_traits>

#include "../pooling.h"
#include "runtime.cuh"
#include "vec.cuh"

namespace fastft {
namespace cuda {
namespace {

constexpr int kLanes = 32;  // threadIdx.x: feature lanes
constexpr int kWarps = 8;   // threadIdx.y: token groups (forward) / rows (backward)

// Forward of mean and max. Block (kLanes, kWarps) covers kLanes * VEC features of one row b; warp y
// walks tokens y, y + kWarps, ...; the warps' partial results meet in shared memory.
template <typename scalar_t, int VEC, bool MAX>
__global__ void __launch_bounds__(kLanes* kWarps) pool_mean_max_kernel(const scalar_t* __restrict__ x,
                                                                        const bool* __restrict__ mask, int64_t T,
                                                                        int64_t H, int64_t sB, int64_t sT, int64_t sH,
                                                                        scalar_t* __restrict__ out,
                                                                        int64_t* __restrict__ index) {
  using acc_t = opmath_type<scalar_t>;
  __shared__ acc_t s_acc[kWarps][kLanes * VEC];
  __shared__ int64_t s_arg[MAX ? kWarps : 1][MAX ? kLanes * VEC : 1];
  __shared__ int64_t s_count[kWarps];
  const int64_t b = blockIdx.y;
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t h0 = static_cast<int64_t>(blockIdx.x) * kLanes * VEC + lane * VEC;
  const bool active = h0 < H;  // with VEC > 1, H % VEC == 0: a vector is all in or all out
  const bool* row = mask == nullptr ? nullptr : mask + b * T;
  const scalar_t* xb = x + b * sB + h0 * sH;

  acc_t acc[VEC];
  int64_t arg[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    acc[k] = MAX ? -INFINITY : acc_t(0);
    arg[k] = -1;
  }
  int64_t count = 0;
  for (int64_t t = warp; t < T; t += kWarps) {
    if (row != nullptr && !row[t]) continue;
    ++count;
    if (!active) continue;
    const auto v = load_vec<scalar_t, VEC>(xb + t * sT);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t e = static_cast<acc_t>(VEC == 1 ? v.val[0] : v.val[k]);
      if constexpr (MAX) {
        // Tokens arrive in increasing order per warp: strictly greater keeps the first maximum.
        const bool take = arg[k] < 0 || e > acc[k] || (isnan(e) && !isnan(acc[k]));
        acc[k] = take ? e : acc[k];
        arg[k] = take ? t : arg[k];
      } else {
        acc[k] += e;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    s_acc[warp][lane * VEC + k] = acc[k];
    if constexpr (MAX) s_arg[warp][lane * VEC + k] = arg[k];
  }
  if (lane == 0) s_count[warp] = count;
  __syncthreads();
  if (warp != 0 || !active) return;
  int64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += s_count[w];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int64_t h = h0 + k;
    acc_t best = MAX ? -INFINITY : acc_t(0);
    int64_t best_t = -1;
    for (int w = 0; w < kWarps; ++w) {
      const acc_t e = s_acc[w][lane * VEC + k];
      if constexpr (MAX) {
        const int64_t t = s_arg[w][lane * VEC + k];
        if (t < 0) continue;
        const bool take = best_t < 0 || e > best || (e == best && t < best_t) || (isnan(e) && !isnan(best)) ||
                          (isnan(e) && isnan(best) && t < best_t);
        best = take ? e : best;
        best_t = take ? t : best_t;
      } else {
        best += e;
      }
    }
    if constexpr (MAX) {
      out[b * H + h] = best_t >= 0 ? static_cast<scalar_t>(best) : scalar_t(0);
      index[b * H + h] = best_t;
    } else {
      out[b * H + h] = total > 0 ? static_cast<scalar_t>(best / static_cast<acc_t>(total)) : scalar_t(0);
    }
  }
}

// Forward of cls / last: the block finds the row's first / last real token, then copies it.
template <typename scalar_t>
__global__ void __launch_bounds__(kLanes* kWarps) pool_pick_kernel(const scalar_t* __restrict__ x,
                                                                    const bool* __restrict__ mask, int64_t T,
                                                                    int64_t H, int64_t sB, int64_t sT, int64_t sH,
                                                                    bool last, scalar_t* __restrict__ out,
                                                                    int64_t* __restrict__ index) {
  __shared__ unsigned long long s_pick;
  const int64_t b = blockIdx.y;
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  constexpr int kThreads = kLanes * kWarps;
  int64_t pick;
  if (mask == nullptr) {
    pick = T == 0 ? -1 : (last ? T - 1 : 0);
  } else {
    // Encoded so that one atomicMin finds the first real token, and the last one too (T-1-t).
    if (tid == 0) s_pick = ~0ull;
    __syncthreads();
    const bool* row = mask + b * T;
    for (int64_t i = tid; i < T; i += kThreads) {
      const int64_t t = last ? T - 1 - i : i;
      if (row[t]) {
        atomicMin(&s_pick, static_cast<unsigned long long>(i));
        break;
      }
    }
    __syncthreads();
    pick = s_pick == ~0ull ? -1 : (last ? T - 1 - static_cast<int64_t>(s_pick) : static_cast<int64_t>(s_pick));
  }
  if (blockIdx.x == 0 && tid == 0) index[b] = pick;
  for (int64_t h = static_cast<int64_t>(blockIdx.x) * kThreads + tid; h < H; h += static_cast<int64_t>(gridDim.x) * kThreads)
    out[b * H + h] = pick < 0 ? scalar_t(0) : x[b * sB + pick * sT + h * sH];
}

// Backward: block (kLanes, kWarps) writes rows (b, t) of d hidden, each warp one row at a time,
// every element exactly once: the pooled gradient where the token was pooled, zero elsewhere.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kLanes* kWarps) pool_backward_kernel(const scalar_t* __restrict__ g,
                                                                        const bool* __restrict__ mask,
                                                                        const int64_t* __restrict__ counts,
                                                                        const int64_t* __restrict__ index, int mode,
                                                                        int64_t B, int64_t T, int64_t H,
                                                                        scalar_t* __restrict__ gx) {
  using acc_t = opmath_type<scalar_t>;
  const int64_t rows = B * T;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t b = r / T, t = r % T;
    const bool real = mask == nullptr || mask[r];
    acc_t scale = 0;
    bool whole_row = false;
    if (mode == static_cast<int>(PoolMode::Mean)) {
      const int64_t c = counts == nullptr ? T : counts[b];
      scale = real && c > 0 ? acc_t(1) / static_cast<acc_t>(c) : acc_t(0);
      whole_row = true;
    } else if (mode != static_cast<int>(PoolMode::Max)) {
      scale = index[b] == t ? acc_t(1) : acc_t(0);
      whole_row = true;
    }
    const scalar_t* gb = g + b * H;
    scalar_t* o = gx + r * H;
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * VEC; h < H; h += kLanes * VEC) {
      const auto gv = load_vec<scalar_t, VEC>(gb + h);
      Vec<scalar_t, VEC> ov;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t e = static_cast<acc_t>(gv.val[k]);
        const bool hit = whole_row ? true : index[b * H + h + k] == t;
        ov.val[k] = static_cast<scalar_t>(whole_row ? e * scale : (hit ? e : acc_t(0)));
      }
      store_vec(o + h, ov);
    }
  }
}

// Whether the kernels may move VEC consecutive features at a time through t: the innermost stride is 1,
// every other stride and the size of the last dim are multiples of VEC, and the data pointer is aligned.
template <typename scalar_t, int VEC>
bool vector_ok(const Tensor& t) {
  const Shape sizes = t.sizes(), strides = t.strides();
  const int64_t d = static_cast<int64_t>(sizes.size());
  if (strides[d - 1] != 1 || sizes[d - 1] % VEC != 0) return false;
  for (int64_t i = 0; i + 1 < d; ++i)
    if (strides[i] % VEC != 0) return false;
  return is_aligned<scalar_t, VEC>(t.const_data_ptr());
}

std::tuple<Tensor, Tensor> masked_pool_cuda(const Tensor& hidden, const std::optional<Tensor>& mask,
                                            const std::string& mode_name) {
  const PoolMode mode = parse_pool_mode(mode_name);
  const auto guard = device_guard(hidden);
  const std::optional<Tensor> m = check_pool_inputs(hidden, mask);
  Tensor out = empty_like_device(hidden, {hidden.size(0), hidden.size(2)});
  Tensor index = make_pool_index(hidden, mode);
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  if (B == 0) return {out, index};
  const bool* mp = m.has_value() ? static_cast<const bool*>(m->const_data_ptr()) : nullptr;
  const cudaStream_t stream = current_stream(hidden);
  const dim3 block(kLanes, kWarps);
  dispatch_floating(hidden.scalar_type(), "fastft.pool", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    const scalar_t* x = static_cast<const scalar_t*>(hidden.const_data_ptr());
    scalar_t* y = static_cast<scalar_t*>(out.mutable_data_ptr());
    const int64_t sB = hidden.stride(0), sT = hidden.stride(1), sH = hidden.stride(2);
    if (mode == PoolMode::Cls || mode == PoolMode::Last) {
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((H + 255) / 256, 64))),
                      static_cast<unsigned>(B));
      pool_pick_kernel<scalar_t><<<grid, block, 0, stream>>>(x, mp, T, H, sB, sT, sH, mode == PoolMode::Last, y,
                                                             static_cast<int64_t*>(index.mutable_data_ptr()));
      check_launch("pool_pick_kernel");
      return;
    }
    if (H == 0) return;
    int64_t* ip = mode == PoolMode::Max ? static_cast<int64_t*>(index.mutable_data_ptr()) : nullptr;
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const dim3 grid(static_cast<unsigned>((H + kLanes * VEC - 1) / (kLanes * VEC)), static_cast<unsigned>(B));
      if (mode == PoolMode::Max)
        pool_mean_max_kernel<scalar_t, VEC, true><<<grid, block, 0, stream>>>(x, mp, T, H, sB, sT, sH, y, ip);
      else
        pool_mean_max_kernel<scalar_t, VEC, false><<<grid, block, 0, stream>>>(x, mp, T, H, sB, sT, sH, y, ip);
      check_launch("pool_mean_max_kernel");
    };
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vector_ok<scalar_t, kVec>(hidden)) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
  });
  return {out, index};
}

Tensor masked_pool_backward_cuda(const Tensor& grad_, const std::optional<Tensor>& mask, const Tensor& index_,
                                 const std::string& mode_name, int64_t T) {
  const PoolMode mode = parse_pool_mode(mode_name);
  const auto guard = device_guard(grad_);
  const std::optional<Tensor> m = bool_mask(mask);
  check_pool_backward_inputs(grad_, m, index_, mode, T);
  const Tensor grad = as_contiguous(grad_);
  const Tensor index = as_contiguous(index_);
  const int64_t B = grad.size(0), H = grad.size(1);
  Tensor gx = empty_like_device(grad, {B, T, H});
  if (gx.numel() == 0) return gx;
  std::optional<Tensor> counts;
  if (mode == PoolMode::Mean && m.has_value()) counts = torch::stable::sum(*m, std::vector<int64_t>{1});
  const bool* mp = m.has_value() ? static_cast<const bool*>(m->const_data_ptr()) : nullptr;
  const int64_t* cp = counts.has_value() ? static_cast<const int64_t*>(counts->const_data_ptr()) : nullptr;
  const int64_t* ip = index.numel() > 0 ? static_cast<const int64_t*>(index.const_data_ptr()) : nullptr;
  const cudaStream_t stream = current_stream(grad);
  const dim3 block(kLanes, kWarps);
  const int64_t rows = B * T;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + kWarps - 1) / kWarps, 65535 * 8));
  dispatch_floating(grad.scalar_type(), "fastft.pool backward", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* g = static_cast<const scalar_t*>(grad.const_data_ptr());
    scalar_t* o = static_cast<scalar_t*>(gx.mutable_data_ptr());
    // grad and d hidden are contiguous [B, H] / [B, T, H]: aligned bases and H % kVec == 0 align every row.
    if (H % kVec == 0 && is_aligned<scalar_t, kVec>(g) && is_aligned<scalar_t, kVec>(o))
      pool_backward_kernel<scalar_t, kVec><<<blocks, block, 0, stream>>>(g, mp, cp, ip, static_cast<int>(mode), B, T,
                                                                         H, o);
    else
      pool_backward_kernel<scalar_t, 1><<<blocks, block, 0, stream>>>(g, mp, cp, ip, static_cast<int>(mode), B, T, H,
                                                                      o);
    check_launch("pool_backward_kernel");
  });
  return gx;
}

}  // namespace
}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("masked_pool", TORCH_BOX(&cuda::masked_pool_cuda));
  m.impl("masked_pool_backward", TORCH_BOX(&cuda::masked_pool_backward_cuda));
}

}  // namespace fastft
