// The LibTorch stable ABI as fastft's kernels use it: every kernel file includes this header and no
// ATen / c10 / torch/extension.h header. CMakeLists.txt compiles the kernels with TORCH_TARGET_VERSION
// set to the oldest torch fastft supports (FASTFT_TORCH_TARGET), so the headers expose only the C shims
// that torch already had, and the one binary loads under that torch and every later one.
//
// Here: the types (torch::stable::Tensor, torch::headeronly's dtypes), the math type of each dtype, the
// dtype switch, and what the stable Tensor does not offer (dense check, shapes and devices as text).
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace fastft {

using torch::headeronly::BFloat16;
using torch::headeronly::Half;
using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;
using Shape = torch::headeronly::IntHeaderOnlyArrayRef;

// The type a kernel computes in: float for the 16-bit dtypes, the dtype itself otherwise (ATen's opmath).
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<Half> {
  using type = float;
};
template <>
struct OpMath<BFloat16> {
  using type = float;
};
template <typename T>
using opmath_type = typename OpMath<T>::type;

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Calls f(T{}) with T the C++ type of the floating dtype t (float, double, Half, BFloat16).
template <typename F>
void dispatch_floating(ScalarType t, const char* op, F&& f) {
  switch (t) {
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    case ScalarType::Half: return f(Half{});
    case ScalarType::BFloat16: return f(BFloat16{});
    default: STD_TORCH_CHECK(false, op, ": dtype ", torch::headeronly::toString(t), " is not supported");
  }
}

// "[2, 3]", as torch prints a shape.
inline std::string shape_str(Shape s) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << ']';
  return out.str();
}

// "cpu", "cuda:0", as torch prints a device.
inline std::string device_str(const Device& d) {
  std::ostringstream out;
  if (d.is_cpu()) out << "cpu";
  else if (d.is_cuda()) out << "cuda";
  else out << "device type " << static_cast<int>(d.type());
  if (d.has_index() && !d.is_cpu()) out << ':' << d.index();
  return out.str();
}

inline const char* dtype_str(ScalarType t) { return torch::headeronly::toString(t); }

inline bool same_shape(Shape a, Shape b) { return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()); }

// torch's Tensor.is_non_overlapping_and_dense(): the elements cover their memory exactly once, in some
// order of the dimensions (size-1 dimensions and empty tensors do not constrain the strides).
inline bool is_non_overlapping_and_dense(const Tensor& t) {
  const Shape sizes = t.sizes(), strides = t.strides();
  const size_t d = sizes.size();
  if (d == 1) return sizes[0] < 2 || strides[0] == 1;
  std::vector<size_t> perm(d);
  std::iota(perm.begin(), perm.end(), size_t{0});
  std::sort(perm.begin(), perm.end(), [&](size_t a, size_t b) {
    if (sizes[a] < 2) return false;
    if (sizes[b] < 2) return true;
    return strides[a] < strides[b];
  });
  int64_t expected = 1;
  for (size_t i : perm) {
    if (sizes[i] < 2) return true;
    if (strides[i] != expected) return false;
    expected *= sizes[i];
  }
  return true;
}

// t itself when it is contiguous (no call through the dispatcher), else a contiguous copy.
inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// A new tensor of `sizes` like `like` (its device; its dtype unless one is given).
inline Tensor empty_like_device(const Tensor& like, const std::vector<int64_t>& sizes,
                                std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::new_empty(like, sizes, dtype);
}

}  // namespace fastft
