// Vector loads and stores for the CUDA kernels: Vec<T, N> moves N elements in one access (each kernel
// picks N so that a vector of its main dtype is 16 bytes).
#pragma once

#include <cstdint>

namespace fastft {
namespace cuda {

// NOTE [alignment]: a Vec<T, N> access is legal only at an address aligned to sizeof(T) * N. A kernel
// takes its vector path only when is_aligned holds for every base pointer it vectorises and every offset
// it adds to them is a multiple of N elements (chunk starts, row strides); the rest, and any unaligned
// base, goes element by element.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename T, int N>
__host__ __device__ __forceinline__ bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * N) == 0;
}

// Vector i of p: elements p[i * N] ... p[i * N + N - 1].
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p, int64_t i = 0) {
  return reinterpret_cast<const Vec<T, N>*>(p)[i];
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v, int64_t i = 0) {
  reinterpret_cast<Vec<T, N>*>(p)[i] = v;
}

}  // namespace cuda
}  // namespace fastft
