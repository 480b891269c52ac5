// Shared pieces of the masked pooling kernels (CPU and CUDA): mode parsing, argument checks, the
// mask in the one form both kernels read (contiguous bool [B, T], or none), output allocation.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/ne.h>
#include <torch/types.h>

#include <string_view>

namespace fastft {

enum class PoolMode { Mean = 0, Max = 1, Cls = 2, Last = 3 };

inline PoolMode parse_pool_mode(std::string_view mode) {
  if (mode == "mean") return PoolMode::Mean;
  if (mode == "max") return PoolMode::Max;
  if (mode == "cls") return PoolMode::Cls;
  if (mode == "last") return PoolMode::Last;
  TORCH_CHECK(false, "fastft.pool: unknown mode '", mode, "'; expected one of 'mean', 'max', 'cls', 'last'");
}

inline void check_pool_dtype(const at::Tensor& t, const char* what) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16 || d == at::kDouble, "fastft.pool: ", what,
              " must be float32, float16, bfloat16 or float64, got ", d);
}

// The mask as a contiguous bool tensor (nonzero = real token); undefined when there is none.
inline at::Tensor bool_mask(const std::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return at::Tensor();
  return (mask->scalar_type() == at::kBool ? *mask : at::ne(*mask, 0)).contiguous();
}

// Validates hidden [B, T, H] and mask [B, T]; returns the mask as a contiguous bool tensor (undefined
// when there is no mask). Any nonzero mask value marks a real token.
inline at::Tensor check_pool_inputs(const at::Tensor& hidden, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(hidden.dim() == 3, "fastft.pool: hidden must be [batch, tokens, features], got shape ", hidden.sizes());
  check_pool_dtype(hidden, "hidden");
  if (!mask.has_value()) return at::Tensor();
  const auto& m = *mask;
  TORCH_CHECK(m.dim() == 2, "fastft.pool: attention_mask must be [batch, tokens], got shape ", m.sizes());
  TORCH_CHECK(m.size(0) == hidden.size(0) && m.size(1) == hidden.size(1), "fastft.pool: attention_mask shape ",
              m.sizes(), " does not match hidden's [batch, tokens] = [", hidden.size(0), ", ", hidden.size(1), "]");
  TORCH_CHECK(m.device() == hidden.device(), "fastft.pool: attention_mask is on ", m.device(), " but hidden is on ",
              hidden.device());
  TORCH_CHECK(!m.is_complex(), "fastft.pool: attention_mask must be bool, integer or float, got ", m.scalar_type());
  return bool_mask(mask);
}

// The index output of the forward: argmax token per feature [B, H] for max, the chosen token [B] for
// cls / last (-1 for a row without a real token), empty for mean.
inline at::Tensor make_pool_index(const at::Tensor& hidden, PoolMode mode) {
  const auto opts = hidden.options().dtype(at::kLong);
  if (mode == PoolMode::Max) return at::empty({hidden.size(0), hidden.size(2)}, opts);
  if (mode == PoolMode::Mean) return at::empty({0}, opts);
  return at::empty({hidden.size(0)}, opts);
}

inline void check_pool_backward_inputs(const at::Tensor& grad, const at::Tensor& mask, const at::Tensor& index,
                                       PoolMode mode, int64_t T) {
  TORCH_CHECK(grad.dim() == 2, "fastft.pool backward: grad must be [batch, features], got ", grad.sizes());
  check_pool_dtype(grad, "grad");
  TORCH_CHECK(T >= 0, "fastft.pool backward: negative token count ", T);
  if (mask.defined())
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == grad.size(0) && mask.size(1) == T,
                "fastft.pool backward: mask shape ", mask.sizes(), " does not match [", grad.size(0), ", ", T, "]");
  if (mode == PoolMode::Max)
    TORCH_CHECK(index.sizes() == grad.sizes() && index.scalar_type() == at::kLong,
                "fastft.pool backward: max needs an int64 index of shape ", grad.sizes());
  if (mode == PoolMode::Cls || mode == PoolMode::Last)
    TORCH_CHECK(index.dim() == 1 && index.size(0) == grad.size(0) && index.scalar_type() == at::kLong,
                "fastft.pool backward: cls/last need an int64 index of shape [", grad.size(0), "]");
}

}  // namespace fastft
