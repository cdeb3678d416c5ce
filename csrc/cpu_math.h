// Vectorisable CPU helpers for the hot loops of the CPU kernels.
//
// The hot loops are compiled once per instruction set (AVX-512, AVX2+FMA, baseline) and picked
// at load time (GCC target_clones), so the same binary runs on any x86-64 and uses the widest
// vectors the machine has. glibc's expf does not vectorise without -ffast-math, so exp is a
// Cephes-style polynomial (max relative error ~2 ulp over the range used here).
#pragma once

#include <cstdint>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SNAPKV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SNAPKV_CPU_CLONES
#endif

namespace snapkv {
namespace cpu {

// exp(x) for x <= 88; inputs below -87.3 return ~1e-38 rather than 0 (callers only pass
// logits minus their row's max or log-sum-exp, where that difference is negligible).
inline float exp_fast(float x) {
  x = x < -87.3365f ? -87.3365f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x*log2(e) to the nearest integer with the 1.5 * 2^23 trick (branch-free, vectorises).
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fx * 0.693359375f;
  r = r + fx * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

// max of s[0..n) (n >= 1).
SNAPKV_CPU_CLONES inline float row_max(const float* __restrict__ s, int64_t n) {
  float m = s[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// sum of exp(s[j] - m) over j < n.
SNAPKV_CPU_CLONES inline float row_sum_exp(const float* __restrict__ s, int64_t n, float m) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += exp_fast(s[j] - m);
  return acc;
}

// acc[j] += exp(s[j] - lse) for j < n.
SNAPKV_CPU_CLONES inline void add_probs(const float* __restrict__ s, int64_t n, float lse,
                                        float* __restrict__ acc) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += exp_fast(s[j] - lse);
}

// acc[j] = pool_combine(mode, acc[j], x[j]) for j < n.
SNAPKV_CPU_CLONES inline void pool_accumulate(Pooling mode, const float* __restrict__ x, int64_t n,
                                              float* __restrict__ acc) {
  if (mode == Pooling::Max) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] = pool_combine(Pooling::Max, acc[j], x[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += x[j];
  }
}

}  // namespace cpu
}  // namespace snapkv
