// CPU kernels of masked pooling: forward (mean, max, cls, last) over hidden [B, T, H] with a
// [B, T] mask, and the fused backward that writes d hidden in one pass. The forward reads only the
// real tokens' rows (padding is never touched) and never builds a [B, T, H] temporary.
#include <cmath>
#include <vector>

#include "../pooling.h"
#include "isa.h"

namespace fastft {
namespace {

// Features per work item of the forward: a row of the accumulator stays in L1/L2 while the
// tokens of one sequence stream through it.
constexpr int64_t kFeatureBlock = 2048;

// acc[k] += x[k] / running max with first-arg-max (x contiguous), vectorised for the CPU at hand.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void add_row(acc_t* __restrict__ acc, const scalar_t* __restrict__ x,
                                                   int64_t n) {
  for (int64_t k = 0; k < n; ++k) acc[k] += static_cast<acc_t>(x[k]);
}

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void max_row(acc_t* __restrict__ best, int64_t* __restrict__ arg,
                                                   const scalar_t* __restrict__ x, int64_t n, int64_t t) {
  for (int64_t k = 0; k < n; ++k) {
    const acc_t v = static_cast<acc_t>(x[k]);
    const bool take = v > best[k] || (v != v && best[k] == best[k]);  // a NaN wins, as in torch.max
    best[k] = take ? v : best[k];
    arg[k] = take ? t : arg[k];
  }
}

template <typename scalar_t, typename acc_t>
void add_row_generic(acc_t* acc, const scalar_t* x, int64_t n) { add_row(acc, x, n); }
template <typename scalar_t, typename acc_t>
void max_row_generic(acc_t* best, int64_t* arg, const scalar_t* x, int64_t n, int64_t t) {
  max_row(best, arg, x, n, t);
}

#ifdef FASTFT_CPU_DISPATCH
template <typename scalar_t, typename acc_t>
FASTFT_TARGET_AVX2 void add_row_avx2(acc_t* acc, const scalar_t* x, int64_t n) {
  add_row(acc, x, n);
}
template <typename scalar_t, typename acc_t>
FASTFT_TARGET_AVX2 void max_row_avx2(acc_t* best, int64_t* arg, const scalar_t* x, int64_t n, int64_t t) {
  max_row(best, arg, x, n, t);
}
#endif

// First / last real token of each row (-1 when none); without a mask: 0 / T - 1 (-1 when T == 0).
std::vector<int64_t> chosen_tokens(const bool* mask, int64_t B, int64_t T, PoolMode mode) {
  std::vector<int64_t> idx(B, -1);
  for (int64_t b = 0; b < B; ++b) {
    if (mask == nullptr) {
      idx[b] = T == 0 ? -1 : (mode == PoolMode::Cls ? 0 : T - 1);
      continue;
    }
    const bool* row = mask + b * T;
    if (mode == PoolMode::Cls) {
      for (int64_t t = 0; t < T; ++t)
        if (row[t]) { idx[b] = t; break; }
    } else {
      for (int64_t t = T - 1; t >= 0; --t)
        if (row[t]) { idx[b] = t; break; }
    }
  }
  return idx;
}

template <typename scalar_t>
void pool_forward_kernel(const Tensor& hidden, const bool* mask, PoolMode mode, Tensor& out, Tensor& index) {
  using acc_t = opmath_type<scalar_t>;
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  const int64_t sB = hidden.stride(0), sT = hidden.stride(1), sH = hidden.stride(2);
  const scalar_t* x = static_cast<const scalar_t*>(hidden.const_data_ptr());
  scalar_t* y = static_cast<scalar_t*>(out.mutable_data_ptr());  // contiguous [B, H]

  if (mode == PoolMode::Cls || mode == PoolMode::Last) {
    const auto idx = chosen_tokens(mask, B, T, mode);
    int64_t* ip = static_cast<int64_t*>(index.mutable_data_ptr());
    // A row copy is tiny: only spread rows over threads when there are many elements to copy.
    torch::stable::parallel_for(0, B, std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        ip[b] = idx[b];
        scalar_t* yr = y + b * H;
        if (idx[b] < 0) {
          for (int64_t h = 0; h < H; ++h) yr[h] = scalar_t(0);
        } else {
          const scalar_t* xr = x + b * sB + idx[b] * sT;
          for (int64_t h = 0; h < H; ++h) yr[h] = xr[h * sH];
        }
      }
    });
    return;
  }

  const int64_t blocks = (H + kFeatureBlock - 1) / kFeatureBlock;
  int64_t* ip = mode == PoolMode::Max ? static_cast<int64_t*>(index.mutable_data_ptr()) : nullptr;
  auto add_fn = &add_row_generic<scalar_t, acc_t>;
  auto max_fn = &max_row_generic<scalar_t, acc_t>;
#ifdef FASTFT_CPU_DISPATCH
  if (cpu_has_avx2()) {
    add_fn = &add_row_avx2<scalar_t, acc_t>;
    max_fn = &max_row_avx2<scalar_t, acc_t>;
  }
#endif
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(T * std::min(H, kFeatureBlock), 1));
  torch::stable::parallel_for(0, B * blocks, grain, [&](int64_t w0, int64_t w1) {
    std::vector<acc_t> acc_buf(std::min(H, kFeatureBlock));
    std::vector<int64_t> arg_buf(mode == PoolMode::Max ? acc_buf.size() : 0);
    std::vector<scalar_t> gather(sH == 1 ? 0 : acc_buf.size());
    acc_t* acc = acc_buf.data();
    int64_t* arg = arg_buf.data();
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / blocks;
      const int64_t h0 = (w % blocks) * kFeatureBlock;
      const int64_t n = std::min(kFeatureBlock, H - h0);
      const bool* row = mask == nullptr ? nullptr : mask + b * T;
      const scalar_t* xb = x + b * sB + h0 * sH;
      // A strided feature dim is gathered into a contiguous row first, so one vector loop serves all.
      auto token = [&](int64_t t) -> const scalar_t* {
        const scalar_t* xt = xb + t * sT;
        if (sH == 1) return xt;
        for (int64_t k = 0; k < n; ++k) gather[k] = xt[k * sH];
        return gather.data();
      };
      int64_t count = 0;
      for (int64_t k = 0; k < n; ++k) {
        acc[k] = acc_t(0);
        if (mode == PoolMode::Max) arg[k] = -1;
      }
      for (int64_t t = 0; t < T; ++t) {
        if (row != nullptr && !row[t]) continue;
        const scalar_t* xt = token(t);
        if (mode == PoolMode::Mean) {
          add_fn(acc, xt, n);
        } else if (count == 0) {
          for (int64_t k = 0; k < n; ++k) {
            acc[k] = static_cast<acc_t>(xt[k]);
            arg[k] = t;
          }
        } else {
          max_fn(acc, arg, xt, n, t);
        }
        ++count;
      }
      scalar_t* yb = y + b * H + h0;
      if (mode == PoolMode::Mean) {
        const acc_t inv = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
        for (int64_t k = 0; k < n; ++k) yb[k] = static_cast<scalar_t>(acc[k] * inv);
      } else {  // max: no real token -> 0, index -1
        for (int64_t k = 0; k < n; ++k) {
          yb[k] = count > 0 ? static_cast<scalar_t>(acc[k]) : scalar_t(0);
          ip[b * H + h0 + k] = count > 0 ? arg[k] : -1;
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> masked_pool_cpu(const Tensor& hidden, const std::optional<Tensor>& mask,
                                           const std::string& mode_name) {
  const PoolMode mode = parse_pool_mode(mode_name);
  const std::optional<Tensor> m = check_pool_inputs(hidden, mask);
  Tensor out = empty_like_device(hidden, {hidden.size(0), hidden.size(2)});
  Tensor index = make_pool_index(hidden, mode);
  const bool* mp = m.has_value() ? static_cast<const bool*>(m->const_data_ptr()) : nullptr;
  dispatch_floating(hidden.scalar_type(), "fastft.pool", [&](auto scalar_tag) {
    pool_forward_kernel<decltype(scalar_tag)>(hidden, mp, mode, out, index);
  });
  return {out, index};
}

template <typename scalar_t>
void pool_backward_kernel(const Tensor& grad, const bool* mask, const Tensor& index, PoolMode mode, Tensor& gx) {
  using acc_t = opmath_type<scalar_t>;
  const int64_t B = gx.size(0), T = gx.size(1), H = gx.size(2);
  const scalar_t* g = static_cast<const scalar_t*>(grad.const_data_ptr());  // contiguous [B, H]
  scalar_t* out = static_cast<scalar_t*>(gx.mutable_data_ptr());            // contiguous [B, T, H]
  std::vector<acc_t> inv_count;
  if (mode == PoolMode::Mean) {
    inv_count.resize(B);
    for (int64_t b = 0; b < B; ++b) {
      int64_t c = T;
      if (mask != nullptr) {
        c = 0;
        for (int64_t t = 0; t < T; ++t) c += mask[b * T + t];
      }
      inv_count[b] = c > 0 ? acc_t(1) / static_cast<acc_t>(c) : acc_t(0);
    }
  }
  const int64_t* ip = index.numel() > 0 ? static_cast<const int64_t*>(index.const_data_ptr()) : nullptr;
  // One pass over d hidden, row by row: every element is written exactly once.
  torch::stable::parallel_for(0, B * T, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      scalar_t* o = out + r * H;
      const scalar_t* gb = g + b * H;
      const bool real = mask == nullptr || mask[r];
      if (mode == PoolMode::Mean) {
        if (real) {
          const acc_t s = inv_count[b];
          for (int64_t h = 0; h < H; ++h) o[h] = static_cast<scalar_t>(static_cast<acc_t>(gb[h]) * s);
        } else {
          for (int64_t h = 0; h < H; ++h) o[h] = scalar_t(0);
        }
      } else if (mode == PoolMode::Max) {
        const int64_t* ib = ip + b * H;
        for (int64_t h = 0; h < H; ++h) o[h] = ib[h] == t ? gb[h] : scalar_t(0);
      } else {
        if (ip[b] == t) {
          for (int64_t h = 0; h < H; ++h) o[h] = gb[h];
        } else {
          for (int64_t h = 0; h < H; ++h) o[h] = scalar_t(0);
        }
      }
    }
  });
}

Tensor masked_pool_backward_cpu(const Tensor& grad_, const std::optional<Tensor>& mask, const Tensor& index,
                                const std::string& mode_name, int64_t T) {
  const PoolMode mode = parse_pool_mode(mode_name);
  const std::optional<Tensor> m = bool_mask(mask);
  check_pool_backward_inputs(grad_, m, index, mode, T);
  const Tensor grad = as_contiguous(grad_);
  const Tensor idx = as_contiguous(index);
  Tensor gx = empty_like_device(grad, {grad.size(0), T, grad.size(1)});
  if (gx.numel() == 0) return gx;
  const bool* mp = m.has_value() ? static_cast<const bool*>(m->const_data_ptr()) : nullptr;
  dispatch_floating(grad.scalar_type(), "fastft.pool backward", [&](auto scalar_tag) {
    pool_backward_kernel<decltype(scalar_tag)>(grad, mp, idx, mode, gx);
  });
  return gx;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("masked_pool", TORCH_BOX(&masked_pool_cpu));
  m.impl("masked_pool_backward", TORCH_BOX(&masked_pool_backward_cpu));
}

}  // namespace fastft
