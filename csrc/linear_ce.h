// Shared pieces of the fused cross-entropy row kernels (CPU and CUDA): argument checks.
#pragma once

#include <torch/types.h>

#include <optional>

namespace fastft {

// logits: float32 [n, V], contiguous (the chunk the caller's GEMM wrote); labels: int64 [n] on the
// same device (ignore_index or a class in [0, V)); row_scale: float32 [n] or none.
inline void check_cross_entropy_rows(const at::Tensor& logits, const at::Tensor& labels,
                                     const std::optional<at::Tensor>& row_scale) {
  TORCH_CHECK(logits.dim() == 2, "fastft.cross_entropy_rows_: logits must be [rows, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "fastft.cross_entropy_rows_: logits must be float32, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.is_contiguous(), "fastft.cross_entropy_rows_: logits must be contiguous");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
              "fastft.cross_entropy_rows_: labels must be [rows] = [", logits.size(0), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastft.cross_entropy_rows_: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == logits.device(), "fastft.cross_entropy_rows_: labels are on ", labels.device(),
              ", logits on ", logits.device());
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->size(0) == logits.size(0) &&
                    row_scale->scalar_type() == at::kFloat && row_scale->device() == logits.device(),
                "fastft.cross_entropy_rows_: row_scale must be float32 [rows] on the logits' device");
  }
}

}  // namespace fastft
