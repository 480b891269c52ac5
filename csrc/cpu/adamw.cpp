// CPU kernels of the AdamW family: the fused AdamW + L2-to-init step and the sum of squares used by
// fused gradient clipping. One call covers all tensors of a (device, dtype) group: the tensors are cut
// into chunks, torch::stable::parallel_for spreads the chunks (not the tensors) over the threads, and each chunk
// is one vectorised pass over memory (reads p, g, m, v [, vmax] [, p0 [, F]]; writes p, m, v [, vmax] [, g]).
#include <algorithm>
#include <cmath>

#include "../adamw.h"
#include "isa.h"

namespace fastft {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item: four fp32 arrays of it stay in L2

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<WorkItem> make_work(const std::vector<Tensor>& tensors) {
  std::vector<WorkItem> work;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) work.push_back({t, b, std::min(n, b + kChunk)});
  }
  return work;
}

// Per-tensor constants of one step, in the math type.
template <typename opmath_t>
struct StepConsts {
  opmath_t inv_grad_scale;   // 1 / grad_scale (1 without AMP), applied alone only when g is written back
  opmath_t grad_mul;         // clip coefficient, negated for maximize (times inv_grad_scale if g is not written)
  opmath_t one_minus_beta1;  // m <- m + (1 - b1) (g - m)
  opmath_t beta2, one_minus_beta2;
  opmath_t coupled_l2;       // 2 * l2_init in coupled mode, else 0
  opmath_t decay;            // 1 - lr * weight_decay
  opmath_t lr_l2;            // lr * l2_init in decoupled mode, else 0
  opmath_t step_size;        // lr / (1 - b1^t)
  opmath_t inv_bc2_sqrt;     // 1 / sqrt(1 - b2^t): a multiply, not a divide, in the loop
  opmath_t eps;
};

// The one loop every variant runs. Without an anchor (l2_init == 0) the drift is 0 and the anchor is
// never read; with IMPORTANCE the drift is weighted by F (EWC), else F = 1 and `f` is never read. `a`
// and `f` must not alias the other arrays (they are restrict, which lets the loop vectorise).
template <typename scalar_t, typename anchor_t, typename opmath_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR, bool IMPORTANCE>
__attribute__((always_inline)) inline void adamw_loop(scalar_t* __restrict__ p, scalar_t* __restrict__ g,
                                                      scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                                                      scalar_t* __restrict__ vmax, const anchor_t* __restrict__ a,
                                                      const anchor_t* __restrict__ f, int64_t n,
                                                      const StepConsts<opmath_t>& c) {
  for (int64_t i = 0; i < n; ++i) {
    opmath_t grad = static_cast<opmath_t>(g[i]);
    if constexpr (STORE_GRAD) {
      grad *= c.inv_grad_scale;
      g[i] = static_cast<scalar_t>(grad);
    }
    grad *= c.grad_mul;
    const opmath_t param = static_cast<opmath_t>(p[i]);
    opmath_t drift = 0;
    if constexpr (ANCHOR) {
      drift = param - static_cast<opmath_t>(a[i]);
      if constexpr (IMPORTANCE) drift *= static_cast<opmath_t>(f[i]);
      grad += c.coupled_l2 * drift;
    }
    opmath_t exp_avg = static_cast<opmath_t>(m[i]);
    exp_avg = exp_avg + c.one_minus_beta1 * (grad - exp_avg);
    opmath_t exp_avg_sq = static_cast<opmath_t>(v[i]) * c.beta2 + c.one_minus_beta2 * grad * grad;
    m[i] = static_cast<scalar_t>(exp_avg);
    v[i] = static_cast<scalar_t>(exp_avg_sq);
    if constexpr (AMSGRAD) {
      exp_avg_sq = std::max(static_cast<opmath_t>(vmax[i]), exp_avg_sq);
      vmax[i] = static_cast<scalar_t>(exp_avg_sq);
    }
    const opmath_t denom = std::sqrt(exp_avg_sq) * c.inv_bc2_sqrt + c.eps;
    opmath_t updated = param * c.decay;
    if constexpr (ANCHOR) updated -= c.lr_l2 * drift;
    p[i] = static_cast<scalar_t>(updated - c.step_size * (exp_avg / denom));
  }
}

template <typename scalar_t, typename anchor_t, typename opmath_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR, bool IMPORTANCE>
void adamw_chunk_generic(scalar_t* p, scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax, const anchor_t* a,
                         const anchor_t* f, int64_t n, const StepConsts<opmath_t>& c) {
  adamw_loop<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>(p, g, m, v, vmax, a, f, n, c);
}

#ifdef FASTFT_CPU_DISPATCH
// The same loop compiled for AVX2 + FMA and for AVX-512 (see isa.h).
template <typename scalar_t, typename anchor_t, typename opmath_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR, bool IMPORTANCE>
FASTFT_TARGET_AVX2 void adamw_chunk_avx2(scalar_t* p, scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax,
                                         const anchor_t* a, const anchor_t* f, int64_t n,
                                         const StepConsts<opmath_t>& c) {
  adamw_loop<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>(p, g, m, v, vmax, a, f, n, c);
}

template <typename scalar_t, typename anchor_t, typename opmath_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR, bool IMPORTANCE>
FASTFT_TARGET_AVX512 void adamw_chunk_avx512(scalar_t* p, scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax,
                                             const anchor_t* a, const anchor_t* f, int64_t n,
                                             const StepConsts<opmath_t>& c) {
  adamw_loop<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>(p, g, m, v, vmax, a, f, n, c);
}
#endif

// The data pointers of one list, taken once per call (each is a call into torch through the stable ABI).
template <typename T>
std::vector<T*> data_ptrs(const std::vector<Tensor>& tensors) {
  std::vector<T*> ptrs(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) ptrs[t] = static_cast<T*>(tensors[t].mutable_data_ptr());
  return ptrs;
}

template <typename scalar_t, typename anchor_t, bool AMSGRAD, bool STORE_GRAD, bool ANCHOR, bool IMPORTANCE>
void adamw_group(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                 const std::vector<Tensor>& max_exp_avg_sqs, const std::vector<Tensor>& anchors,
                 const std::vector<Tensor>& importances, const std::vector<opmath_type<scalar_t>>& steps, double lr, double beta1, double beta2,
                 double weight_decay, double eps, double l2_init, bool coupled, bool maximize,
                 double inv_grad_scale, double clip_coef) {
  using opmath_t = opmath_type<scalar_t>;
  std::vector<StepConsts<opmath_t>> consts(params.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const double step = steps[t];
    auto& c = consts[t];
    c.inv_grad_scale = static_cast<opmath_t>(inv_grad_scale);
    const double mul = maximize ? -clip_coef : clip_coef;
    c.grad_mul = static_cast<opmath_t>(STORE_GRAD ? mul : mul * inv_grad_scale);
    c.one_minus_beta1 = static_cast<opmath_t>(1.0 - beta1);
    c.beta2 = static_cast<opmath_t>(beta2);
    c.one_minus_beta2 = static_cast<opmath_t>(1.0 - beta2);
    c.coupled_l2 = static_cast<opmath_t>(coupled ? 2.0 * l2_init : 0.0);
    c.decay = static_cast<opmath_t>(1.0 - lr * weight_decay);
    c.lr_l2 = static_cast<opmath_t>(coupled ? 0.0 : lr * l2_init);
    c.step_size = static_cast<opmath_t>(lr / (1.0 - std::pow(beta1, step)));
    c.inv_bc2_sqrt = static_cast<opmath_t>(1.0 / std::sqrt(1.0 - std::pow(beta2, step)));
    c.eps = static_cast<opmath_t>(eps);
  }
  const auto work = make_work(params);
  const auto p = data_ptrs<scalar_t>(params), g = data_ptrs<scalar_t>(grads), m = data_ptrs<scalar_t>(exp_avgs),
             v = data_ptrs<scalar_t>(exp_avg_sqs);
  const auto vmax = AMSGRAD ? data_ptrs<scalar_t>(max_exp_avg_sqs) : std::vector<scalar_t*>{};
  const auto a = ANCHOR ? data_ptrs<anchor_t>(anchors) : std::vector<anchor_t*>{};
  const auto f = IMPORTANCE ? data_ptrs<anchor_t>(importances) : std::vector<anchor_t*>{};
  auto chunk_fn = &adamw_chunk_generic<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>;
#ifdef FASTFT_CPU_DISPATCH
  if (cpu_has_avx512()) chunk_fn = &adamw_chunk_avx512<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>;
  else if (cpu_has_avx2()) chunk_fn = &adamw_chunk_avx2<scalar_t, anchor_t, opmath_t, AMSGRAD, STORE_GRAD, ANCHOR, IMPORTANCE>;
#endif
  torch::stable::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const auto& item = work[w];
      const auto t = item.tensor;
      const auto off = item.begin;
      chunk_fn(p[t] + off, g[t] + off, m[t] + off, v[t] + off, AMSGRAD ? vmax[t] + off : nullptr,
               ANCHOR ? a[t] + off : nullptr, IMPORTANCE ? f[t] + off : nullptr, item.end - item.begin, consts[t]);
    }
  });
}

// Turns the four runtime flags into template arguments, so each loop is branch-free.
template <typename scalar_t, typename anchor_t, bool... Flags>
void adamw_dispatch_flags(std::initializer_list<bool> flags, auto&&... args) {
  if constexpr (sizeof...(Flags) == 4) {
    adamw_group<scalar_t, anchor_t, Flags...>(args...);
  } else {
    if (flags.begin()[sizeof...(Flags)]) adamw_dispatch_flags<scalar_t, anchor_t, Flags..., true>(flags, args...);
    else adamw_dispatch_flags<scalar_t, anchor_t, Flags..., false>(flags, args...);
  }
}

float read_scalar(const Tensor& t) { return *static_cast<const float*>(t.const_data_ptr()); }

void adamw_l2init_cpu(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                      const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                      const std::vector<Tensor>& max_exp_avg_sqs, const std::vector<Tensor>& state_steps,
                      const std::vector<Tensor>& anchors_, const std::vector<Tensor>& importances_, double lr, double beta1, double beta2, double weight_decay,
                      double eps, double l2_init, bool coupled, bool amsgrad, bool maximize,
                      const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                      const std::optional<Tensor>& clip_coef) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors_, importances_, amsgrad,
                   l2_init);
  if (params.empty()) return;
  // With l2_init == 0 the anchors and importances are never read: drop them.
  const std::vector<Tensor> anchors = l2_init == 0.0 ? std::vector<Tensor>{} : anchors_;
  const std::vector<Tensor> importances = l2_init == 0.0 ? std::vector<Tensor>{} : importances_;
  const Device device = params[0].device();
  check_scalar_arg(grad_scale, device, "grad_scale");
  check_scalar_arg(found_inf, device, "found_inf");
  check_scalar_arg(clip_coef, device, "clip_coef");
  if (found_inf.has_value() && read_scalar(*found_inf) != 0.0f) return;  // skipped step: nothing changes

  const double inv_grad_scale = grad_scale.has_value() ? 1.0 / read_scalar(*grad_scale) : 1.0;
  const double clip = clip_coef.has_value() ? read_scalar(*clip_coef) : 1.0;
  const ScalarType dtype = params[0].scalar_type();
  const ScalarType anchor_dtype = anchors.empty() ? dtype : anchors[0].scalar_type();
  for (const auto& a : anchors)
    STD_TORCH_CHECK(a.scalar_type() == anchor_dtype,
                    "fastft.adamw_l2init_: all anchors of one call must share a dtype");

  dispatch_floating(dtype, "fastft.adamw_l2init_", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    using opmath_t = opmath_type<scalar_t>;
    std::vector<opmath_t> steps(params.size());
    for (size_t t = 0; t < params.size(); ++t) {
      float* s = static_cast<float*>(state_steps[t].mutable_data_ptr());
      *s += 1.0f;
      steps[t] = static_cast<opmath_t>(*s);
    }
    const bool store_grad = grad_scale.has_value();
    auto run = [&](auto anchor_tag) {
      using anchor_t = decltype(anchor_tag);
      adamw_dispatch_flags<scalar_t, anchor_t>({amsgrad, store_grad, !anchors.empty(), !importances.empty()}, params,
                                               grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, importances, steps, lr, beta1, beta2,
                                               weight_decay, eps, l2_init, coupled, maximize, inv_grad_scale, clip);
    };
    if (anchors.empty() || anchor_dtype == dtype) run(scalar_t{});
    else if (anchor_dtype == ScalarType::Float) run(float{});
    else if (anchor_dtype == ScalarType::BFloat16) run(BFloat16{});
    else run(Half{});
  });
}

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline acc_t sum_sq_loop(const scalar_t* x, int64_t n) {
  // Eight independent partial sums let the compiler vectorise without -ffast-math reassociation.
  acc_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const acc_t v = static_cast<acc_t>(x[i + k]);
      acc[k] += v * v;
    }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    acc[0] += v * v;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename scalar_t, typename acc_t>
acc_t sum_sq_generic(const scalar_t* x, int64_t n) { return sum_sq_loop<scalar_t, acc_t>(x, n); }

#ifdef FASTFT_CPU_DISPATCH
template <typename scalar_t, typename acc_t>
FASTFT_TARGET_AVX2 acc_t sum_sq_avx2(const scalar_t* x, int64_t n) {
  return sum_sq_loop<scalar_t, acc_t>(x, n);
}
#endif

Tensor sum_of_squares_cpu(const std::vector<Tensor>& tensors) {
  check_sum_of_squares_args(tensors);
  const ScalarType dtype = tensors[0].scalar_type();
  const ScalarType acc_dtype = dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor out = empty_like_device(tensors[0], {}, acc_dtype);
  dispatch_floating(dtype, "fastft.sum_of_squares", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = opmath_type<scalar_t>;
    const auto work = make_work(tensors);
    std::vector<const scalar_t*> x(tensors.size());
    for (size_t t = 0; t < tensors.size(); ++t) x[t] = static_cast<const scalar_t*>(tensors[t].const_data_ptr());
    auto fn = &sum_sq_generic<scalar_t, acc_t>;
#ifdef FASTFT_CPU_DISPATCH
    if (cpu_has_avx2()) fn = &sum_sq_avx2<scalar_t, acc_t>;
#endif
    // Partial sums per work item, added in a fixed order: the result does not depend on the thread count.
    std::vector<acc_t> partial(work.size(), acc_t(0));
    torch::stable::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const auto& item = work[w];
        partial[w] = fn(x[item.tensor] + item.begin, item.end - item.begin);
      }
    });
    acc_t total = 0;
    for (acc_t p : partial) total += p;
    *static_cast<acc_t*>(out.mutable_data_ptr()) = total;
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("adamw_l2init_", TORCH_BOX(&adamw_l2init_cpu));
  m.impl("sum_of_squares", TORCH_BOX(&sum_of_squares_cpu));
}

}  // namespace fastft
