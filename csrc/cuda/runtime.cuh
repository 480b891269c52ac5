// What a CUDA kernel launch needs from torch, through the stable ABI only: the device guard, torch's
// current stream, and the launch check.
#pragma once

#include <cuda_runtime.h>
#include <dlfcn.h>

#include "../stable.h"

namespace fastft {
namespace cuda {

// NOTE [CUDA-only shims]: the current-stream getter lives in libtorch_cuda.so, which a CPU build of
// torch does not have. A direct call would leave an undefined symbol that makes fastft._C fail to load
// under a CPU torch (Python loads extensions with RTLD_NOW), so the getter is looked up at its first
// use in the libtorch_cuda.so torch has already loaded (RTLD_NOLOAD never loads anything new). Under a
// CPU torch no CUDA tensor exists, so no CUDA kernel of fastft is ever dispatched to ask for it. The
// signature is that of aoti_torch_get_current_cuda_stream in torch/csrc/inductor/aoti_torch/c/shim.h.
// The CUDA runtime itself is linked statically (CMakeLists.txt), for the same reason.
using CurrentStreamFn = AOTITorchError (*)(int32_t device_index, void** ret_stream);

inline CurrentStreamFn current_stream_fn() {
  static const CurrentStreamFn fn = [] {
    const char* name = "aoti_torch_get_current_cuda_stream";
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib != nullptr ? dlsym(lib, name) : dlsym(RTLD_DEFAULT, name);
    return reinterpret_cast<CurrentStreamFn>(sym);
  }();
  return fn;
}

// torch's current stream on the device of t (kernels run on it, ordered with torch's own work).
inline cudaStream_t current_stream(const Tensor& t) {
  const CurrentStreamFn fn = current_stream_fn();
  STD_TORCH_CHECK(fn != nullptr, "fastft: a CUDA kernel was called, but this torch has no CUDA "
                                 "(aoti_torch_get_current_cuda_stream not found in libtorch_cuda.so)");
  void* stream = nullptr;
  STD_TORCH_CHECK(fn(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "fastft: torch could not give the current CUDA stream of device ", t.get_device_index());
  return static_cast<cudaStream_t>(stream);
}

// Makes t's device the current one for the scope (torch's DeviceGuard).
inline torch::stable::accelerator::DeviceGuard device_guard(const Tensor& t) {
  return torch::stable::accelerator::DeviceGuard(t.get_device_index());
}

// After every launch: a bad configuration or an earlier asynchronous error surfaces here, named.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "fastft: CUDA kernel ", kernel, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace fastft
