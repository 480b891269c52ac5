// CUDA kernels of the AdamW family: the fused AdamW + L2-to-init step and the sum of squares used by
// fused gradient clipping, both as multi-tensor apply over a (device, dtype) group.
#include <type_traits>

#include "../adamw.h"
#include "multi_tensor_apply.cuh"
#include "runtime.cuh"
#include "vec.cuh"

namespace fastft {
namespace cuda {
namespace {

struct AdamWHyper {
  double lr, beta1, beta2, weight_decay, eps, l2_init;
  bool coupled, maximize;
};

template <typename opmath_t>
struct Consts {
  opmath_t inv_grad_scale, grad_mul, one_minus_beta1, beta2, one_minus_beta2, coupled_l2, decay, lr_l2,
      step_size, inv_bc2_sqrt, eps;
};

// p * (1 - lr * wd) rounded on its own, never contracted into an FMA: torch.optim.AdamW rounds it
// separately, and a contracted form drifts from it by ~1e-5 relative over 100 steps.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// With IMPORTANCE the pull is weighted by EWC's F (stored in the anchor's dtype); else F = 1.
template <typename scalar_t, typename anchor_t, typename opmath_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR,
          bool IMPORTANCE>
__device__ __forceinline__ void adamw_element(scalar_t& p, scalar_t& g, scalar_t& m, scalar_t& v, scalar_t& vmax,
                                              anchor_t a, anchor_t f, const Consts<opmath_t>& c) {
  opmath_t grad = static_cast<opmath_t>(g);
  if constexpr (STORE_GRAD) {
    grad *= c.inv_grad_scale;
    g = static_cast<scalar_t>(grad);
  }
  grad *= c.grad_mul;
  const opmath_t param = static_cast<opmath_t>(p);
  opmath_t drift = 0;
  if constexpr (ANCHOR) {
    drift = param - static_cast<opmath_t>(a);
    if constexpr (IMPORTANCE) drift *= static_cast<opmath_t>(f);
    grad += c.coupled_l2 * drift;
  }
  opmath_t exp_avg = static_cast<opmath_t>(m);
  exp_avg = exp_avg + c.one_minus_beta1 * (grad - exp_avg);
  opmath_t exp_avg_sq = static_cast<opmath_t>(v) * c.beta2 + c.one_minus_beta2 * grad * grad;
  m = static_cast<scalar_t>(exp_avg);
  v = static_cast<scalar_t>(exp_avg_sq);
  if constexpr (AMSGRAD) {
    exp_avg_sq = max(static_cast<opmath_t>(vmax), exp_avg_sq);
    vmax = static_cast<scalar_t>(exp_avg_sq);
  }
  const opmath_t denom = sqrt(exp_avg_sq) * c.inv_bc2_sqrt + c.eps;
  opmath_t updated = mul_rn(param, c.decay);
  if constexpr (ANCHOR) updated -= c.lr_l2 * drift;
  p = static_cast<scalar_t>(updated - c.step_size * (exp_avg / denom));
}

// addresses: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 max_exp_avg_sqs (AMSGRAD), 5 anchors (ANCHOR),
// 6 importances (IMPORTANCE).
template <typename scalar_t, typename anchor_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR, bool IMPORTANCE>
__global__ void __launch_bounds__(kBlockSize) adamw_l2init_kernel(TensorListMeta<7> meta, AdamWHyper h,
                                                                    const float* grad_scale, const float* found_inf,
                                                                    const float* clip_coef) {
  using opmath_t = opmath_type<scalar_t>;
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunkSize), meta.numel[t] - start));
  scalar_t* p = static_cast<scalar_t*>(meta.addresses[0][t]) + start;
  scalar_t* g = static_cast<scalar_t*>(meta.addresses[1][t]) + start;
  scalar_t* m = static_cast<scalar_t*>(meta.addresses[2][t]) + start;
  scalar_t* v = static_cast<scalar_t*>(meta.addresses[3][t]) + start;
  scalar_t* vmax = AMSGRAD ? static_cast<scalar_t*>(meta.addresses[4][t]) + start : nullptr;
  const anchor_t* a = ANCHOR ? static_cast<const anchor_t*>(meta.addresses[5][t]) + start : nullptr;
  const anchor_t* f = IMPORTANCE ? static_cast<const anchor_t*>(meta.addresses[6][t]) + start : nullptr;

  const opmath_t step = static_cast<opmath_t>(*meta.steps[t]);
  Consts<opmath_t> c;
  c.inv_grad_scale = grad_scale != nullptr ? opmath_t(1) / static_cast<opmath_t>(*grad_scale) : opmath_t(1);
  const opmath_t clip = clip_coef != nullptr ? static_cast<opmath_t>(*clip_coef) : opmath_t(1);
  c.grad_mul = (h.maximize ? -clip : clip) * (STORE_GRAD ? opmath_t(1) : c.inv_grad_scale);
  c.one_minus_beta1 = static_cast<opmath_t>(1.0 - h.beta1);
  c.beta2 = static_cast<opmath_t>(h.beta2);
  c.one_minus_beta2 = static_cast<opmath_t>(1.0 - h.beta2);
  c.coupled_l2 = static_cast<opmath_t>(h.coupled ? 2.0 * h.l2_init : 0.0);
  c.decay = static_cast<opmath_t>(1.0 - h.lr * h.weight_decay);
  c.lr_l2 = static_cast<opmath_t>(h.coupled ? 0.0 : h.lr * h.l2_init);
  c.step_size = static_cast<opmath_t>(h.lr) / (opmath_t(1) - pow(static_cast<opmath_t>(h.beta1), step));
  c.inv_bc2_sqrt = opmath_t(1) / sqrt(opmath_t(1) - pow(static_cast<opmath_t>(h.beta2), step));
  c.eps = static_cast<opmath_t>(h.eps);

  bool aligned = is_aligned<scalar_t, VEC>(p) && is_aligned<scalar_t, VEC>(g) && is_aligned<scalar_t, VEC>(m) &&
                 is_aligned<scalar_t, VEC>(v);
  if constexpr (ANCHOR) aligned = aligned && is_aligned<anchor_t, VEC>(a);
  if constexpr (IMPORTANCE) aligned = aligned && is_aligned<anchor_t, VEC>(f);
  if constexpr (AMSGRAD) aligned = aligned && is_aligned<scalar_t, VEC>(vmax);
  int scalar_from = 0;
  if (aligned) {
    const int nvec = n / VEC;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      auto rp = load_vec<scalar_t, VEC>(p, i);
      auto rg = load_vec<scalar_t, VEC>(g, i);
      auto rm = load_vec<scalar_t, VEC>(m, i);
      auto rv = load_vec<scalar_t, VEC>(v, i);
      Vec<anchor_t, VEC> ra;
      if constexpr (ANCHOR) ra = load_vec<anchor_t, VEC>(a, i);
      Vec<anchor_t, VEC> rf;
      if constexpr (IMPORTANCE) rf = load_vec<anchor_t, VEC>(f, i);
      Vec<scalar_t, VEC> rvmax;
      if constexpr (AMSGRAD) rvmax = load_vec<scalar_t, VEC>(vmax, i);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        adamw_element<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>(
            rp.val[k], rg.val[k], rm.val[k], rv.val[k], rvmax.val[k], ra.val[k], rf.val[k], c);
      store_vec(p, rp, i);
      if constexpr (STORE_GRAD) store_vec(g, rg, i);
      store_vec(m, rm, i);
      store_vec(v, rv, i);
      if constexpr (AMSGRAD) store_vec(vmax, rvmax, i);
    }
    scalar_from = nvec * VEC;
  }
  for (int i = scalar_from + threadIdx.x; i < n; i += blockDim.x) {
    scalar_t dummy{};
    scalar_t& vm = AMSGRAD ? vmax[i] : dummy;
    const anchor_t ai = ANCHOR ? a[i] : anchor_t{};
    const anchor_t fi = IMPORTANCE ? f[i] : anchor_t{};
    adamw_element<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>(p[i], g[i], m[i], v[i], vm, ai,
                                                                                     fi, c);
  }
}

// state_steps += 1, then -= found_inf (as torch's fused AdamW: the step is counted before the update
// reads it, and a skipped step takes its 1 back), for up to kStepsPerLaunch steps per launch.
constexpr int kStepsPerLaunch = 128;
struct StepList {
  float* steps[kStepsPerLaunch];
  int n;
};

__global__ void count_steps_kernel(StepList list, const float* found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= list.n) return;
  float s = *list.steps[i] + 1.f;
  if (found_inf != nullptr) s -= *found_inf;
  *list.steps[i] = s;
}

void count_steps(const std::vector<Tensor>& state_steps, const float* found_inf, cudaStream_t stream) {
  for (size_t begin = 0; begin < state_steps.size(); begin += kStepsPerLaunch) {
    StepList list{};
    list.n = static_cast<int>(std::min(state_steps.size() - begin, static_cast<size_t>(kStepsPerLaunch)));
    for (int i = 0; i < list.n; ++i) list.steps[i] = static_cast<float*>(state_steps[begin + i].mutable_data_ptr());
    count_steps_kernel<<<1, kStepsPerLaunch, 0, stream>>>(list, found_inf);
    check_launch("count_steps_kernel");
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x) {
  __shared__ acc_t warp_sums[kBlockSize / 32];
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;  // valid in thread 0
}

// One partial sum of squares per block, written to partial[first_block + blockIdx.x]; the partials
// are then added by torch's sum, so the result does not depend on scheduling.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockSize) sum_of_squares_kernel(TensorListMeta<1> meta, acc_t* partial) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int n = static_cast<int>(min(static_cast<int64_t>(kChunkSize), meta.numel[t] - start));
  const scalar_t* x = static_cast<const scalar_t*>(meta.addresses[0][t]) + start;
  acc_t acc = 0;
  int scalar_from = 0;
  if (is_aligned<scalar_t, VEC>(x)) {
    const int nvec = n / VEC;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const auto r = load_vec<scalar_t, VEC>(x, i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t e = static_cast<acc_t>(r.val[k]);
        acc += e * e;
      }
    }
    scalar_from = nvec * VEC;
  }
  for (int i = scalar_from + threadIdx.x; i < n; i += blockDim.x) {
    const acc_t e = static_cast<acc_t>(x[i]);
    acc += e * e;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[meta.first_block + blockIdx.x] = acc;
}

void adamw_l2init_cuda(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                       const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                       const std::vector<Tensor>& max_exp_avg_sqs, const std::vector<Tensor>& state_steps,
                       const std::vector<Tensor>& anchors_, const std::vector<Tensor>& importances_, double lr,
                       double beta1, double beta2,
                       double weight_decay, double eps, double l2_init, bool coupled, bool amsgrad, bool maximize,
                       const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                       const std::optional<Tensor>& clip_coef) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors_, importances_, amsgrad,
                   l2_init);
  if (params.empty()) return;
  const Device device = params[0].device();
  check_scalar_arg(grad_scale, device, "grad_scale");
  check_scalar_arg(found_inf, device, "found_inf");
  check_scalar_arg(clip_coef, device, "clip_coef");
  const bool use_anchor = l2_init != 0.0;
  const std::vector<Tensor> anchors = use_anchor ? anchors_ : std::vector<Tensor>{};
  const std::vector<Tensor> importances = use_anchor ? importances_ : std::vector<Tensor>{};
  const bool use_importance = !importances.empty();
  const ScalarType dtype = params[0].scalar_type();
  const ScalarType anchor_dtype = use_anchor ? anchors[0].scalar_type() : dtype;
  for (const auto& a : anchors)
    STD_TORCH_CHECK(a.scalar_type() == anchor_dtype,
                    "fastft.adamw_l2init_: all anchors of one call must share a dtype");

  const auto guard = device_guard(params[0]);
  const cudaStream_t stream = current_stream(params[0]);
  const float* gs = grad_scale.has_value() ? static_cast<const float*>(grad_scale->const_data_ptr()) : nullptr;
  const float* fi = found_inf.has_value() ? static_cast<const float*>(found_inf->const_data_ptr()) : nullptr;
  const float* cc = clip_coef.has_value() ? static_cast<const float*>(clip_coef->const_data_ptr()) : nullptr;
  count_steps(state_steps, fi, stream);

  const AdamWHyper h{lr, beta1, beta2, weight_decay, eps, l2_init, coupled, maximize};
  const std::vector<Tensor> no_list;
  const std::vector<std::vector<Tensor>> lists{
      params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : no_list, anchors, importances};
  const bool store_grad = grad_scale.has_value();

  dispatch_floating(dtype, "fastft.adamw_l2init_", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    // The runtime flags become template arguments, so each kernel is branch-free.
    auto run = [&](auto anchor_tag, auto ams_tag, auto store_tag, auto anchor_on_tag, auto importance_tag) {
      using anchor_t = decltype(anchor_tag);
      constexpr bool AMS = decltype(ams_tag)::value, STORE = decltype(store_tag)::value,
                     ANCHOR = decltype(anchor_on_tag)::value, IMPORTANCE = decltype(importance_tag)::value;
      multi_tensor_apply<7>(lists, state_steps, [&](const TensorListMeta<7>& meta, int blocks) {
        adamw_l2init_kernel<scalar_t, anchor_t, AMS, STORE, ANCHOR, IMPORTANCE>
            <<<blocks, kBlockSize, 0, stream>>>(meta, h, gs, fi, cc);
        check_launch("adamw_l2init_kernel");
      });
    };
    using T = std::true_type;
    using F = std::false_type;
    auto with_anchor = [&](auto anchor_tag, auto ams_tag, auto store_tag) {  // importances exist only with anchors
      use_importance ? run(anchor_tag, ams_tag, store_tag, T{}, T{}) : run(anchor_tag, ams_tag, store_tag, T{}, F{});
    };
    auto with_anchor_flag = [&](auto anchor_tag, auto ams_tag, auto store_tag) {
      if constexpr (std::is_same_v<decltype(anchor_tag), scalar_t>) {
        use_anchor ? with_anchor(anchor_tag, ams_tag, store_tag) : run(anchor_tag, ams_tag, store_tag, F{}, F{});
      } else {
        with_anchor(anchor_tag, ams_tag, store_tag);  // a narrower anchor dtype only exists with anchors
      }
    };
    auto with_flags = [&](auto anchor_tag) {
      if (amsgrad) store_grad ? with_anchor_flag(anchor_tag, T{}, T{}) : with_anchor_flag(anchor_tag, T{}, F{});
      else store_grad ? with_anchor_flag(anchor_tag, F{}, T{}) : with_anchor_flag(anchor_tag, F{}, F{});
    };
    if (anchor_dtype == dtype) with_flags(scalar_t{});
    else if (anchor_dtype == ScalarType::Float) with_flags(float{});
    else if (anchor_dtype == ScalarType::BFloat16) with_flags(BFloat16{});
    else with_flags(Half{});
  });
}

Tensor sum_of_squares_cuda(const std::vector<Tensor>& tensors) {
  check_sum_of_squares_args(tensors);
  const ScalarType dtype = tensors[0].scalar_type();
  const ScalarType acc_dtype = dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  const auto guard = device_guard(tensors[0]);
  const int64_t chunks = count_chunks(tensors);
  if (chunks == 0) return torch::stable::new_zeros(tensors[0], std::vector<int64_t>{}, acc_dtype);
  Tensor partial = empty_like_device(tensors[0], {chunks}, acc_dtype);
  const cudaStream_t stream = current_stream(tensors[0]);
  dispatch_floating(dtype, "fastft.sum_of_squares", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = opmath_type<scalar_t>;
    acc_t* out = static_cast<acc_t*>(partial.mutable_data_ptr());
    multi_tensor_apply<1>({tensors}, {}, [&](const TensorListMeta<1>& meta, int blocks) {
      sum_of_squares_kernel<scalar_t, acc_t><<<blocks, kBlockSize, 0, stream>>>(meta, out);
      check_launch("sum_of_squares_kernel");
    });
  });
  return torch::stable::sum(partial);
}

}  // namespace
}  // namespace cuda

STABLE_TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("adamw_l2init_", TORCH_BOX(&cuda::adamw_l2init_cuda));
  m.impl("sum_of_squares", TORCH_BOX(&cuda::sum_of_squares_cuda));
}

}  // namespace fastft
