// Argument checks of the AdamW family (adamw_l2init_ and sum_of_squares): the CPU and CUDA kernels
// call the same ones, so both fail with the same message before touching any memory.
#pragma once

#include <optional>
#include <vector>

#include "stable.h"

namespace fastft {

// p0 (the anchor) may be stored in a narrower dtype than the parameter (anchor_dtype=bfloat16).
inline bool anchor_dtype_ok(ScalarType param, ScalarType anchor) {
  return anchor == param || anchor == ScalarType::Float || anchor == ScalarType::BFloat16 ||
         anchor == ScalarType::Half;
}

// Every list holds the same number of tensors (or is empty where allowed); tensor i of every list
// has param i's shape, device and layout, and the flat element order is the same (dense, equal
// strides), so kernels can walk all of them with one flat index.
inline void check_adamw_args(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                             const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                             const std::vector<Tensor>& max_exp_avg_sqs, const std::vector<Tensor>& state_steps,
                             const std::vector<Tensor>& anchors, const std::vector<Tensor>& importances, bool amsgrad,
                             double l2_init) {
  const size_t n = params.size();
  STD_TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
                  "fastft.adamw_l2init_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length, got ",
                  n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", state_steps.size());
  STD_TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n,
                  "fastft.adamw_l2init_: amsgrad=True needs one max_exp_avg_sq per param, got ", max_exp_avg_sqs.size(),
                  " for ", n);
  STD_TORCH_CHECK(anchors.empty() || anchors.size() == n,
                  "fastft.adamw_l2init_: anchors must be empty (no L2-to-init) or one per param, got ", anchors.size(),
                  " for ", n);
  STD_TORCH_CHECK(l2_init == 0.0 || !anchors.empty(), "fastft.adamw_l2init_: l2_init=", l2_init, " needs anchors");
  STD_TORCH_CHECK(importances.empty() || (importances.size() == n && anchors.size() == n),
                  "fastft.adamw_l2init_: importances must be empty (F = 1) or one per param, each with its anchor, got ",
                  importances.size(), " importances and ", anchors.size(), " anchors for ", n, " params");
  if (n == 0) return;
  const ScalarType dtype = params[0].scalar_type();
  const Device device = params[0].device();
  STD_TORCH_CHECK(is_floating(dtype), "fastft.adamw_l2init_: parameters must be float32, float16, bfloat16 or float64, got ",
                  dtype_str(dtype));
  auto same = [&](const Tensor& t, const Tensor& p, const char* what, size_t i, bool check_dtype) {
    STD_TORCH_CHECK(t.layout() == torch::headeronly::Layout::Strided, "fastft.adamw_l2init_: ", what, "[", i,
                    "] is not a dense (strided) tensor");
    STD_TORCH_CHECK(t.device() == device, "fastft.adamw_l2init_: ", what, "[", i, "] is on ", device_str(t.device()),
                    " but params are on ", device_str(device));
    STD_TORCH_CHECK(!check_dtype || t.scalar_type() == dtype, "fastft.adamw_l2init_: ", what, "[", i, "] has dtype ",
                    dtype_str(t.scalar_type()), " but params are ", dtype_str(dtype));
    STD_TORCH_CHECK(same_shape(t.sizes(), p.sizes()), "fastft.adamw_l2init_: ", what, "[", i, "] has shape ",
                    shape_str(t.sizes()), " but its param has shape ", shape_str(p.sizes()));
    STD_TORCH_CHECK(same_shape(t.strides(), p.strides()) || t.numel() <= 1, "fastft.adamw_l2init_: ", what, "[", i,
                    "] has strides ", shape_str(t.strides()), " but its param has strides ", shape_str(p.strides()));
  };
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    STD_TORCH_CHECK(p.layout() == torch::headeronly::Layout::Strided && is_non_overlapping_and_dense(p),
                    "fastft.adamw_l2init_: params[", i, "] must be a dense, non-overlapping strided tensor");
    STD_TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, "fastft.adamw_l2init_: params[", i, "] is ",
                    dtype_str(p.scalar_type()), " on ", device_str(p.device()), " but params[0] is ", dtype_str(dtype),
                    " on ", device_str(device), " (call the op once per (device, dtype) group)");
    same(grads[i], p, "grads", i, true);
    same(exp_avgs[i], p, "exp_avgs", i, true);
    same(exp_avg_sqs[i], p, "exp_avg_sqs", i, true);
    if (amsgrad) same(max_exp_avg_sqs[i], p, "max_exp_avg_sqs", i, true);
    if (!anchors.empty()) {
      same(anchors[i], p, "anchors", i, false);
      STD_TORCH_CHECK(anchor_dtype_ok(dtype, anchors[i].scalar_type()), "fastft.adamw_l2init_: anchors[", i,
                      "] has dtype ", dtype_str(anchors[i].scalar_type()),
                      "; an anchor must be float32, bfloat16, float16 or its param's dtype (", dtype_str(dtype), ")");
    }
    if (!importances.empty()) {
      same(importances[i], p, "importances", i, false);
      STD_TORCH_CHECK(importances[i].scalar_type() == anchors[i].scalar_type(), "fastft.adamw_l2init_: importances[",
                      i, "] has dtype ", dtype_str(importances[i].scalar_type()), " but its anchor has dtype ",
                      dtype_str(anchors[i].scalar_type()), "; an importance is stored in its anchor's dtype");
    }
    const Tensor& s = state_steps[i];
    STD_TORCH_CHECK(s.numel() == 1 && s.scalar_type() == ScalarType::Float && s.device() == device,
                    "fastft.adamw_l2init_: state_steps[", i, "] must be a one-element float32 tensor on ",
                    device_str(device));
  }
}

inline void check_scalar_arg(const std::optional<Tensor>& t, const Device& device, const char* name) {
  if (!t.has_value()) return;
  STD_TORCH_CHECK(t->numel() == 1 && t->scalar_type() == ScalarType::Float && t->device() == device,
                  "fastft.adamw_l2init_: ", name, " must be a one-element float32 tensor on ", device_str(device),
                  ", got ", dtype_str(t->scalar_type()), " with ", t->numel(), " elements on ", device_str(t->device()));
}

inline void check_sum_of_squares_args(const std::vector<Tensor>& tensors) {
  STD_TORCH_CHECK(!tensors.empty(), "fastft.sum_of_squares: needs at least one tensor");
  const ScalarType dtype = tensors[0].scalar_type();
  const Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    STD_TORCH_CHECK(t.scalar_type() == dtype && t.device() == device, "fastft.sum_of_squares: tensors[", i, "] is ",
                    dtype_str(t.scalar_type()), " on ", device_str(t.device()), " but tensors[0] is ", dtype_str(dtype),
                    " on ", device_str(device));
    STD_TORCH_CHECK(t.layout() == torch::headeronly::Layout::Strided && is_non_overlapping_and_dense(t),
                    "fastft.sum_of_squares: tensors[", i, "] must be dense and non-overlapping");
    STD_TORCH_CHECK(is_floating(dtype),
                    "fastft.sum_of_squares: tensors must be float32, float16, bfloat16 or float64, got ",
                    dtype_str(dtype));
  }
}

}  // namespace fastft
