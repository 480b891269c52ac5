// Run-time choice of the CPU instruction set. The wheel targets baseline x86-64; a hot loop is compiled
// a second and third time with FASTFT_TARGET_AVX2 / FASTFT_TARGET_AVX512 and the variant to call is
// picked once per op call from cpu_has_avx2() / cpu_has_avx512().
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTFT_CPU_DISPATCH 1
#define FASTFT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTFT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")))

namespace fastft {

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}

}  // namespace fastft
#endif
