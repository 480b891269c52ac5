// The op schemas of the `fastft` library, registered through the stable ABI like the kernels; the
// kernels are reached through torch.ops.fastft, which dispatches CPU / CUDA by itself. The `fastft._C`
// Python module that loads them all is in module.cpp.
#include "stable.h"

STABLE_TORCH_LIBRARY(fastft, m) {
  // One fused AdamW step with L2-to-init over a list of tensors of one (device, dtype) group.
  // Modelled on aten::_fused_adamw_, plus: anchors (p0, empty when l2_init == 0), importances (EWC's
  // F, in the anchors' dtype; empty: F = 1) weighting the pull F * (p - p0), l2_init and its mode,
  // state_steps incremented by the op itself (not when found_inf is set), and an optional clip
  // coefficient multiplied into the gradient. grads are written only when grad_scale is given
  // (they are unscaled in place, as torch's fused AdamW does).
  m.def(
      "adamw_l2init_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, Tensor[] anchors, Tensor[] importances, *, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, float l2_init, bool coupled, bool amsgrad, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  // Sum of squares of all elements of all tensors, accumulated in float32 (float64 for float64): a 0-dim tensor.
  m.def("sum_of_squares(Tensor[] tensors) -> Tensor");
  // Masked pooling of hidden [B, T, H] over the real tokens of mask [B, T] (None: all real), mode
  // "mean" | "max" | "cls" | "last". Returns (pooled [B, H], index): index is the arg-max token per
  // feature [B, H] for max, the chosen token [B] for cls/last (-1: no real token), empty for mean.
  m.def("masked_pool(Tensor hidden, Tensor? mask, str mode) -> (Tensor, Tensor)");
  // d hidden [B, tokens, H] from d pooled [B, H], written in one pass (zeros where nothing was pooled).
  m.def("masked_pool_backward(Tensor grad, Tensor? mask, Tensor index, str mode, SymInt tokens) -> Tensor");
  // Fused cross-entropy over a chunk of float32 logits [n, V] with labels [n]: returns the per-row loss
  // [n] (log-sum-exp minus the target's logit; 0 at rows whose label is ignore_index) and, when
  // write_grad, overwrites the logits with the gradient of sum_r w_r * loss_r, (softmax - onehot) * w_r
  // with w_r = scale * row_scale[r] (row_scale None: scale), 0 at ignored rows. Labels must be
  // ignore_index or in [0, V) (checked by the caller). The GEMMs around it are the caller's.
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor labels, Tensor? row_scale, float scale, int ignore_index, "
        "bool write_grad) -> Tensor");
}
