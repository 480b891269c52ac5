// Shared pieces of the masked pooling kernels (CPU and CUDA): mode parsing, argument checks, the
// mask in the one form both kernels read (contiguous bool [B, T], or none), output allocation.
#pragma once

#include <optional>
#include <string_view>

#include "stable.h"

namespace fastft {

enum class PoolMode { Mean = 0, Max = 1, Cls = 2, Last = 3 };

inline PoolMode parse_pool_mode(std::string_view mode) {
  if (mode == "mean") return PoolMode::Mean;
  if (mode == "max") return PoolMode::Max;
  if (mode == "cls") return PoolMode::Cls;
  if (mode == "last") return PoolMode::Last;
  STD_TORCH_CHECK(false, "fastft.pool: unknown mode '", std::string(mode),
                  "'; expected one of 'mean', 'max', 'cls', 'last'");
  return PoolMode::Mean;
}

inline void check_pool_dtype(const Tensor& t, const char* what) {
  const ScalarType d = t.scalar_type();
  STD_TORCH_CHECK(is_floating(d), "fastft.pool: ", what, " must be float32, float16, bfloat16 or float64, got ",
                  dtype_str(d));
}

// The mask as a contiguous bool tensor (nonzero = real token); none when there is none. For the
// (non-complex) dtypes the checks let through, the cast to bool is mask != 0.
inline std::optional<Tensor> bool_mask(const std::optional<Tensor>& mask) {
  if (!mask.has_value()) return std::nullopt;
  const Tensor m = mask->scalar_type() == ScalarType::Bool ? *mask : torch::stable::to(*mask, ScalarType::Bool);
  return as_contiguous(m);
}

// Validates hidden [B, T, H] and mask [B, T]; returns the mask as a contiguous bool tensor (none when
// there is no mask). Any nonzero mask value marks a real token.
inline std::optional<Tensor> check_pool_inputs(const Tensor& hidden, const std::optional<Tensor>& mask) {
  STD_TORCH_CHECK(hidden.dim() == 3, "fastft.pool: hidden must be [batch, tokens, features], got shape ",
                  shape_str(hidden.sizes()));
  check_pool_dtype(hidden, "hidden");
  if (!mask.has_value()) return std::nullopt;
  const Tensor& m = *mask;
  STD_TORCH_CHECK(m.dim() == 2, "fastft.pool: attention_mask must be [batch, tokens], got shape ", shape_str(m.sizes()));
  STD_TORCH_CHECK(m.size(0) == hidden.size(0) && m.size(1) == hidden.size(1), "fastft.pool: attention_mask shape ",
                  shape_str(m.sizes()), " does not match hidden's [batch, tokens] = [", hidden.size(0), ", ",
                  hidden.size(1), "]");
  STD_TORCH_CHECK(m.device() == hidden.device(), "fastft.pool: attention_mask is on ", device_str(m.device()),
                  " but hidden is on ", device_str(hidden.device()));
  const ScalarType md = m.scalar_type();
  STD_TORCH_CHECK(md != ScalarType::ComplexHalf && md != ScalarType::ComplexFloat && md != ScalarType::ComplexDouble,
                  "fastft.pool: attention_mask must be bool, integer or float, got ", dtype_str(md));
  return bool_mask(mask);
}

// The index output of the forward: argmax token per feature [B, H] for max, the chosen token [B] for
// cls / last (-1 for a row without a real token), empty for mean.
inline Tensor make_pool_index(const Tensor& hidden, PoolMode mode) {
  if (mode == PoolMode::Max) return empty_like_device(hidden, {hidden.size(0), hidden.size(2)}, ScalarType::Long);
  if (mode == PoolMode::Mean) return empty_like_device(hidden, {0}, ScalarType::Long);
  return empty_like_device(hidden, {hidden.size(0)}, ScalarType::Long);
}

inline void check_pool_backward_inputs(const Tensor& grad, const std::optional<Tensor>& mask, const Tensor& index,
                                       PoolMode mode, int64_t T) {
  STD_TORCH_CHECK(grad.dim() == 2, "fastft.pool backward: grad must be [batch, features], got ",
                  shape_str(grad.sizes()));
  check_pool_dtype(grad, "grad");
  STD_TORCH_CHECK(T >= 0, "fastft.pool backward: negative token count ", T);
  if (mask.has_value())
    STD_TORCH_CHECK(mask->dim() == 2 && mask->size(0) == grad.size(0) && mask->size(1) == T,
                    "fastft.pool backward: mask shape ", shape_str(mask->sizes()), " does not match [", grad.size(0),
                    ", ", T, "]");
  if (mode == PoolMode::Max)
    STD_TORCH_CHECK(same_shape(index.sizes(), grad.sizes()) && index.scalar_type() == ScalarType::Long,
                    "fastft.pool backward: max needs an int64 index of shape ", shape_str(grad.sizes()));
  if (mode == PoolMode::Cls || mode == PoolMode::Last)
    STD_TORCH_CHECK(index.dim() == 1 && index.size(0) == grad.size(0) && index.scalar_type() == ScalarType::Long,
                    "fastft.pool backward: cls/last need an int64 index of shape [", grad.size(0), "]");
}

}  // namespace fastft
