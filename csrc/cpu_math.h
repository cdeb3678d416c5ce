// Vectorisable CPU helpers for the hot loops of the CPU kernels.
//
// The hot loops are compiled once per instruction set (AVX-512, AVX2+FMA, baseline) and picked
// at load time (GCC target_clones), so the same binary runs on any x86-64 and uses the widest
// vectors the machine has. glibc's expf does not vectorise without -ffast-math, so exp is a
// Cephes-style polynomial (max relative error ~2 ulp over the range used here).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#include <immintrin.h>
#define SNAPKV_CPU_BF16_DOT 1
#define SNAPKV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SNAPKV_CPU_CLONES
#endif

namespace snapkv {
namespace cpu {

// An environment switch: set and not "0".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

// exp(x) for x <= 88; 0 below -87.3 (the smallest normal float's log), -inf included.
inline float exp_fast(float x) {
  const bool underflow = x < -87.3365f;  // also -inf: exp is 0 there, exactly
  x = underflow ? -87.3365f : x;
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
  return underflow ? 0.f : y * __builtin_bit_cast(float, bits);
}

// A block of attention logits, transposed: st[j * ldr + r] = sum_d key(j, d) * qt[d * ldr + r]
// for keys j < nb and rows r < ldr (ldr a multiple of 32). Register tile: 8 keys x 32 rows,
// 16 vector accumulators; each key element is broadcast, the queries are loaded as vectors,
// so the keys need no transpose (only the small query matrix is stored transposed). Keys are
// float32 or bfloat16 (raw bits, widened in the loop: no conversion pass over the keys).
template <typename KeyT>
inline float widen(KeyT x);
template <>
inline float widen<float>(float x) { return x; }
template <>
inline float widen<uint16_t>(uint16_t x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
}

template <typename KeyT>
__attribute__((always_inline)) inline void block_logits_t_impl(const KeyT* __restrict__ k, int64_t nb, int64_t D,
                                                               const float* __restrict__ qt, int64_t ldr,
                                                               float* __restrict__ st) {
  typedef float v16 __attribute__((vector_size(64)));
  auto load = [](const float* p) {
    v16 v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
  };
  auto store = [](float* p, v16 v) { __builtin_memcpy(p, &v, sizeof(v)); };
  for (int64_t r0 = 0; r0 < ldr; r0 += 32) {
    int64_t j0 = 0;
    for (; j0 + 8 <= nb; j0 += 8) {
      v16 acc[8][2] = {};
      const KeyT* kr = k + j0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const v16 q0 = load(qt + d * ldr + r0), q1 = load(qt + d * ldr + r0 + 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const float kv = widen<KeyT>(kr[i * D + d]);
          acc[i][0] += kv * q0;
          acc[i][1] += kv * q1;
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        store(st + (j0 + i) * ldr + r0, acc[i][0]);
        store(st + (j0 + i) * ldr + r0 + 16, acc[i][1]);
      }
    }
    for (; j0 < nb; ++j0) {  // the last keys of a block, one at a time
      v16 a0 = {}, a1 = {};
      for (int64_t d = 0; d < D; ++d) {
        const float kv = widen<KeyT>(k[j0 * D + d]);
        a0 += kv * load(qt + d * ldr + r0);
        a1 += kv * load(qt + d * ldr + r0 + 16);
      }
      store(st + j0 * ldr + r0, a0);
      store(st + j0 * ldr + r0 + 16, a1);
    }
  }
}

SNAPKV_CPU_CLONES inline void block_logits_t(const float* __restrict__ k, int64_t nb, int64_t D,
                                             const float* __restrict__ qt, int64_t ldr, float* __restrict__ st) {
  block_logits_t_impl<float>(k, nb, D, qt, ldr, st);
}

// The same with bfloat16 keys given as raw bits.
SNAPKV_CPU_CLONES inline void block_logits_t_bf16(const uint16_t* __restrict__ k, int64_t nb, int64_t D,
                                                  const float* __restrict__ qt, int64_t ldr, float* __restrict__ st) {
  block_logits_t_impl<uint16_t>(k, nb, D, qt, ldr, st);
}

// Whether block_logits_bf16_dot can run here: x86-64 with AVX512-BF16 (vdpbf16ps), e.g. Zen 4/5,
// Sapphire Rapids and later. SNAPKV_CPU_NO_BF16_DOT=1 turns it off (the tests use it to check the
// widening kernel on machines that have the instruction).
inline bool has_bf16_dot() {
#ifdef SNAPKV_CPU_BF16_DOT
  static const bool ok = __builtin_cpu_supports("avx512bf16") && !env_flag("SNAPKV_CPU_NO_BF16_DOT");
  return ok;
#else
  return false;
#endif
}

// block_logits_t for bfloat16 keys AND queries with the AVX512-BF16 dot product: each vdpbf16ps
// multiplies two bf16 pairs per lane (exact products, fp32 accumulation), half the instructions
// of widening the keys. Keys k[nb][D] (D even) are read as 32-bit pairs (k[j][2e], k[j][2e+1]);
// the queries come as pairs too, qp[e * ldr + r] = (q[r][2e], q[r][2e+1]), unscaled, and the
// logits are scaled on the way out: st[j * ldr + r] = scale * dot(key j, query r).
#ifdef SNAPKV_CPU_BF16_DOT
// Two bf16 values as one 32-bit word (memcpy: no alignment or aliasing assumption).
inline int32_t load_pair(const uint16_t* p) {
  int32_t x;
  __builtin_memcpy(&x, p, sizeof(x));
  return x;
}

__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void block_logits_bf16_dot(
    const uint16_t* __restrict__ k, int64_t nb, int64_t D, const uint32_t* __restrict__ qp, int64_t ldr,
    float scale, float* __restrict__ st) {
  const int64_t D2 = D / 2;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t r0 = 0; r0 < ldr; r0 += 32) {
    int64_t j0 = 0;
    for (; j0 + 8 <= nb; j0 += 8) {  // register tile: 8 keys x 32 rows
      __m512 acc[8][2];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      const uint16_t* kr = k + j0 * D;
      for (int64_t e = 0; e < D2; ++e) {
        const __m512bh q0 = (__m512bh)_mm512_loadu_si512(qp + e * ldr + r0);
        const __m512bh q1 = (__m512bh)_mm512_loadu_si512(qp + e * ldr + r0 + 16);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          const __m512bh kv = (__m512bh)_mm512_set1_epi32(load_pair(kr + i * D + 2 * e));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], kv, q0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], kv, q1);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(st + (j0 + i) * ldr + r0, _mm512_mul_ps(acc[i][0], sc));
        _mm512_storeu_ps(st + (j0 + i) * ldr + r0 + 16, _mm512_mul_ps(acc[i][1], sc));
      }
    }
    for (; j0 < nb; ++j0) {  // the last keys of a block, one at a time
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t e = 0; e < D2; ++e) {
        const __m512bh kv = (__m512bh)_mm512_set1_epi32(load_pair(k + j0 * D + 2 * e));
        a0 = _mm512_dpbf16_ps(a0, kv, (__m512bh)_mm512_loadu_si512(qp + e * ldr + r0));
        a1 = _mm512_dpbf16_ps(a1, kv, (__m512bh)_mm512_loadu_si512(qp + e * ldr + r0 + 16));
      }
      _mm512_storeu_ps(st + j0 * ldr + r0, _mm512_mul_ps(a0, sc));
      _mm512_storeu_ps(st + j0 * ldr + r0 + 16, _mm512_mul_ps(a1, sc));
    }
  }
}
#endif

// exp_fast for common.h's helpers that take their exp.
struct ExpFast {
  float operator()(float x) const { return exp_fast(x); }
};

// Soft-caps rows r < n of a transposed logits block st[nb][ldr] in place (common.h's rule).
SNAPKV_CPU_CLONES inline void softcap_block(float* __restrict__ st, int64_t nb, int64_t ldr, int64_t n,
                                            float softcap) {
  for (int64_t j = 0; j < nb; ++j) {
    float* row = st + j * ldr;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) row[r] = softcap_logit(row[r], softcap, ExpFast{});
  }
}

// Per-row softmax statistics of a transposed logits block st[nb][ldr] over rows r < n:
// m[r] = max_j st[j][r], l[r] = sum_j exp(st[j][r] - m[r]) (l = 0 where every logit is -inf).
SNAPKV_CPU_CLONES inline void block_row_stats(const float* __restrict__ st, int64_t nb, int64_t ldr, int64_t n,
                                              float* __restrict__ m, float* __restrict__ l) {
  for (int64_t r = 0; r < n; ++r) m[r] = -INFINITY;
  for (int64_t j = 0; j < nb; ++j) {
    const float* row = st + j * ldr;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) m[r] = row[r] > m[r] ? row[r] : m[r];
  }
  for (int64_t r = 0; r < n; ++r) l[r] = 0.f;
  for (int64_t j = 0; j < nb; ++j) {
    const float* row = st + j * ldr;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) {
      const float ref = m[r] == -INFINITY ? 0.f : m[r];
      l[r] += exp_fast(row[r] - ref);
    }
  }
}

// sum over i < n of exp(s[i] - lse[i]).
SNAPKV_CPU_CLONES inline float sum_probs(const float* __restrict__ s, const float* __restrict__ lse, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += exp_fast(s[i] - lse[i]);
  return acc;
}

// y[j - j0] = pooled x over the whole window [j - k/2, j + k/2] for j in [j0, j1) (the caller
// keeps those windows inside x). Blocks of 64 outputs stay in registers across the k offsets.
SNAPKV_CPU_CLONES inline void pool_interior(Pooling mode, const float* __restrict__ x, int64_t j0, int64_t j1,
                                            int64_t kernel_size, float* __restrict__ y) {
  constexpr int64_t kTile = 64;
  const int64_t half = kernel_size / 2;
  for (int64_t j = j0; j < j1; j += kTile) {
    const int64_t n = j1 - j < kTile ? j1 - j : kTile;
    const float* w = x + j - half;
    float acc[kTile];
    if (mode == Pooling::Max) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) acc[t] = w[t];
      for (int64_t o = 1; o < kernel_size; ++o) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) acc[t] = pool_combine(Pooling::Max, acc[t], w[t + o]);
      }
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) y[j - j0 + t] = acc[t];
    } else {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) acc[t] = 0.f;
      for (int64_t o = 0; o < kernel_size; ++o) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) acc[t] += w[t + o];
      }
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) y[j - j0 + t] = pool_finish(Pooling::Avg, acc[t], kernel_size);
    }
  }
}

}  // namespace cpu
}  // namespace snapkv
