// Shared pieces of the fused cross-entropy row kernels (CPU and CUDA): argument checks.
#pragma once

#include <optional>

#include "stable.h"

namespace fastft {

// logits: float32 [n, V], contiguous (the chunk the caller's GEMM wrote); labels: int64 [n] on the
// same device (ignore_index or a class in [0, V)); row_scale: float32 [n] or none.
inline void check_cross_entropy_rows(const Tensor& logits, const Tensor& labels, const std::optional<Tensor>& row_scale) {
  STD_TORCH_CHECK(logits.dim() == 2, "fastft.cross_entropy_rows_: logits must be [rows, vocab], got ",
                  shape_str(logits.sizes()));
  STD_TORCH_CHECK(logits.scalar_type() == ScalarType::Float, "fastft.cross_entropy_rows_: logits must be float32, got ",
                  dtype_str(logits.scalar_type()));
  STD_TORCH_CHECK(logits.is_contiguous(), "fastft.cross_entropy_rows_: logits must be contiguous");
  STD_TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0),
                  "fastft.cross_entropy_rows_: labels must be [rows] = [", logits.size(0), "], got ",
                  shape_str(labels.sizes()));
  STD_TORCH_CHECK(labels.scalar_type() == ScalarType::Long, "fastft.cross_entropy_rows_: labels must be int64, got ",
                  dtype_str(labels.scalar_type()));
  STD_TORCH_CHECK(labels.device() == logits.device(), "fastft.cross_entropy_rows_: labels are on ",
                  device_str(labels.device()), ", logits on ", device_str(logits.device()));
  if (row_scale.has_value()) {
    STD_TORCH_CHECK(row_scale->dim() == 1 && row_scale->size(0) == logits.size(0) &&
                        row_scale->scalar_type() == ScalarType::Float && row_scale->device() == logits.device(),
                    "fastft.cross_entropy_rows_: row_scale must be float32 [rows] on the logits' device");
  }
}

}  // namespace fastft
