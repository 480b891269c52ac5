// Argument checks of the AdamW family (adamw_l2init_ and sum_of_squares): the CPU and CUDA kernels
// call the same ones, so both fail with the same message before touching any memory.
#pragma once

#include <torch/types.h>

#include <optional>
#include <vector>

namespace fastft {

// p0 (the anchor) may be stored in a narrower dtype than the parameter (anchor_dtype=bfloat16).
inline bool anchor_dtype_ok(at::ScalarType param, at::ScalarType anchor) {
  return anchor == param || anchor == at::kFloat || anchor == at::kBFloat16 || anchor == at::kHalf;
}

// Every list holds the same number of tensors (or is empty where allowed); tensor i of every list
// has param i's shape, device and layout, and the flat element order is the same (dense, equal
// strides), so kernels can walk all of them with one flat index.
inline void check_adamw_args(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                             const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& state_steps,
                             const std::vector<at::Tensor>& anchors, bool amsgrad, double l2_init) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              "fastft.adamw_l2init_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ",
              n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", state_steps.size());
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
              "fastft.adamw_l2init_: amsgrad=True needs one max_exp_avg_sq per param, got ", max_exp_avg_sqs.size(), " for ", n);
  TORCH_CHECK(anchors.empty() || anchors.size() == n,
              "fastft.adamw_l2init_: anchors must be empty (no L2-to-init) or one per param, got ", anchors.size(), " for ", n);
  TORCH_CHECK(l2_init == 0.0 || !anchors.empty(), "fastft.adamw_l2init_: l2_init=", l2_init, " needs anchors");
  if (n == 0) return;
  const auto dtype = params[0].scalar_type();
  const auto device = params[0].device();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "fastft.adamw_l2init_: parameters must be float32, float16, bfloat16 or float64, got ", dtype);
  auto same = [&](const at::Tensor& t, const at::Tensor& p, const char* what, size_t i, bool check_dtype) {
    TORCH_CHECK(t.layout() == at::kStrided, "fastft.adamw_l2init_: ", what, "[", i, "] is not a dense (strided) tensor");
    TORCH_CHECK(t.device() == device, "fastft.adamw_l2init_: ", what, "[", i, "] is on ", t.device(), " but params are on ", device);
    TORCH_CHECK(!check_dtype || t.scalar_type() == dtype, "fastft.adamw_l2init_: ", what, "[", i, "] has dtype ",
                t.scalar_type(), " but params are ", dtype);
    TORCH_CHECK(t.sizes() == p.sizes(), "fastft.adamw_l2init_: ", what, "[", i, "] has shape ", t.sizes(),
                " but its param has shape ", p.sizes());
    TORCH_CHECK(t.strides() == p.strides() || t.numel() <= 1, "fastft.adamw_l2init_: ", what, "[", i, "] has strides ",
                t.strides(), " but its param has strides ", p.strides());
  };
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(),
                "fastft.adamw_l2init_: params[", i, "] must be a dense, non-overlapping strided tensor");
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, "fastft.adamw_l2init_: params[", i, "] is ",
                p.scalar_type(), " on ", p.device(), " but params[0] is ", dtype, " on ", device,
                " (call the op once per (device, dtype) group)");
    same(grads[i], p, "grads", i, true);
    same(exp_avgs[i], p, "exp_avgs", i, true);
    same(exp_avg_sqs[i], p, "exp_avg_sqs", i, true);
    if (amsgrad) same(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i, true);
    if (!anchors.empty()) {
      same(anchors[i], p, "anchors", i, false);
      TORCH_CHECK(anchor_dtype_ok(dtype, anchors[i].scalar_type()), "fastft.adamw_l2init_: anchors[", i, "] has dtype ",
                  anchors[i].scalar_type(), "; an anchor must be float32, bfloat16, float16 or its param's dtype (", dtype, ")");
    }
    const auto& s = state_steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device,
                "fastft.adamw_l2init_: state_steps[", i, "] must be a one-element float32 tensor on ", device);
  }
}

inline void check_scalar_arg(const std::optional<at::Tensor>& t, const at::Device& device, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, "fastft.adamw_l2init_: ", name,
              " must be a one-element float32 tensor on ", device, ", got ", t->scalar_type(), " with ", t->numel(),
              " elements on ", t->device());
}

inline void check_sum_of_squares_args(const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(!tensors.empty(), "fastft.sum_of_squares: needs at least one tensor");
  const auto dtype = tensors[0].scalar_type();
  const auto device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == device, "fastft.sum_of_squares: tensors[", i, "] is ",
                t.scalar_type(), " on ", t.device(), " but tensors[0] is ", dtype, " on ", device);
    TORCH_CHECK(t.layout() == at::kStrided && t.is_non_overlapping_and_dense(),
                "fastft.sum_of_squares: tensors[", i, "] must be dense and non-overlapping");
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
                "fastft.sum_of_squares: tensors must be float32, float16, bfloat16 or float64, got ", dtype);
  }
}

}  // namespace fastft
