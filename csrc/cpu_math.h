// Vectorisable CPU helpers for the hot loops of the CPU kernels.
//
// Every helper here is always-inline and templated (or plain scalar code): the kernels
// instantiate them once per CPU path inside a function compiled for that instruction set
// (cpu_isa.h's SNAPKV_CPU_VARIANTS), so the same source compiles to AVX-512, AVX2+FMA or the
// baseline with tiles sized for each. glibc's expf does not vectorise without -ffast-math, so exp
// is a Cephes-style polynomial (max relative error ~2 ulp over the range used here).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "cpu_isa.h"

#ifdef SNAPKV_CPU_X86
#include <immintrin.h>
#endif

#if !defined(__FLT16_MAX__)
#include <c10/util/Half.h>
#endif

#define SNAPKV_AI __attribute__((always_inline)) inline

namespace snapkv {
namespace cpu {

// float16 as the loops see it: the compiler's _Float16 where it has one (F16C conversions on the
// avx2 and avx512 paths), else c10::Half (same bits).
#if defined(__FLT16_MAX__)
using Half16 = _Float16;
#define SNAPKV_HAVE_FLOAT16 1
#else
using Half16 = c10::Half;
#endif

// An environment switch: set and not "0".
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

// exp(x) for x <= 88; 0 below -87.3 (the smallest normal float's log), -inf included.
SNAPKV_AI float exp_fast(float x) {
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

// Widens a key element to fp32: float, bfloat16 as raw bits, float16.
template <typename KeyT>
SNAPKV_AI float widen(KeyT x) {
  if constexpr (std::is_same_v<KeyT, uint16_t>) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(x) << 16);
  } else {
    return static_cast<float>(x);
  }
}

// n key elements as fp32 (a block of bf16/f16 keys into a worker's scratch, once per block).
template <typename KeyT>
SNAPKV_AI void widen_rows(const KeyT* __restrict__ x, int64_t n, float* __restrict__ y) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = widen<KeyT>(x[i]);
}

// A block of attention logits, transposed: st[j * ldr + r] = sum_d k[j * D + d] * qt[d * ldr + r]
// for keys j < nb and rows r < ldr (ldr a multiple of 32). Register tile of the path (cpu_isa.h):
// Isa::kKeys keys x Isa::kRowVecs vectors of rows; each key element is broadcast, the queries
// are loaded as vectors, so the keys need no transpose (only the small query matrix is stored
// transposed). Per step of d: kRowVecs loads, kKeys broadcasts, kKeys * kRowVecs FMAs.
template <class Isa, int NK>
SNAPKV_AI void logits_tile(const float* __restrict__ k, int64_t D, const float* __restrict__ qt, int64_t ldr,
                           int64_t r0, float* __restrict__ st) {
  typedef typename Isa::vec V;
  constexpr int RV = Isa::kRowVecs, W = Isa::kLanes;
  V acc[NK][RV];
#pragma GCC unroll 16
  for (int i = 0; i < NK; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) acc[i][v] = V{} ;
  for (int64_t d = 0; d < D; ++d) {
    V q[RV];
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) __builtin_memcpy(&q[v], qt + d * ldr + r0 + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < NK; ++i) {
      const float kv = k[i * D + d];
#pragma GCC unroll 4
      for (int v = 0; v < RV; ++v) acc[i][v] += kv * q[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < NK; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < RV; ++v) __builtin_memcpy(st + i * ldr + r0 + v * W, &acc[i][v], sizeof(V));
}

// The last nk < Isa::kKeys keys of a block, as one narrower tile.
template <class Isa, int NK = Isa::kKeys - 1>
SNAPKV_AI void logits_tail(const float* __restrict__ k, int64_t nk, int64_t D, const float* __restrict__ qt,
                           int64_t ldr, int64_t r0, float* __restrict__ st) {
  if constexpr (NK > 0) {
    if (nk == NK) return logits_tile<Isa, NK>(k, D, qt, ldr, r0, st);
    logits_tail<Isa, NK - 1>(k, nk, D, qt, ldr, r0, st);
  }
}

template <class Isa>
SNAPKV_AI void block_logits_t(const float* __restrict__ k, int64_t nb, int64_t D, const float* __restrict__ qt,
                              int64_t ldr, float* __restrict__ st) {
  constexpr int64_t kRows = Isa::kRowVecs * Isa::kLanes;
  static_assert(32 % kRows == 0, "a row tile divides 32 (ldr is a multiple of 32)");
  for (int64_t r0 = 0; r0 < ldr; r0 += kRows) {
    int64_t j0 = 0;
    for (; j0 + Isa::kKeys <= nb; j0 += Isa::kKeys) logits_tile<Isa, Isa::kKeys>(k + j0 * D, D, qt, ldr, r0, st + j0 * ldr);
    if (j0 < nb) logits_tail<Isa>(k + j0 * D, nb - j0, D, qt, ldr, r0, st + j0 * ldr);
  }
}

// block_logits_t for bfloat16 keys AND queries with the AVX512-BF16 dot product: each vdpbf16ps
// multiplies two bf16 pairs per lane (exact products, fp32 accumulation), half the instructions
// of widening the keys. Keys k[nb][D] (D even) are read as 32-bit pairs (k[j][2e], k[j][2e+1]);
// the queries come as pairs too, qp[e * ldr + r] = (q[r][2e], q[r][2e+1]), unscaled, and the
// logits are scaled on the way out: st[j * ldr + r] = scale * dot(key j, query r).
#ifdef SNAPKV_CPU_X86
// Two bf16 values as one 32-bit word (memcpy: no alignment or aliasing assumption).
SNAPKV_AI int32_t load_pair(const uint16_t* p) {
  int32_t x;
  __builtin_memcpy(&x, p, sizeof(x));
  return x;
}

SNAPKV_TARGET_AVX512BF16 inline void block_logits_bf16_dot(
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
  SNAPKV_AI float operator()(float x) const { return exp_fast(x); }
};

// Soft-caps rows r < n of a transposed logits block st[nb][ldr] in place (common.h's rule).
SNAPKV_AI void softcap_block(float* __restrict__ st, int64_t nb, int64_t ldr, int64_t n,
                                            float softcap) {
  for (int64_t j = 0; j < nb; ++j) {
    float* row = st + j * ldr;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) row[r] = softcap_logit(row[r], softcap, ExpFast{});
  }
}

// Per-row softmax statistics of a transposed logits block st[nb][ldr] over rows r < n:
// m[r] = max_j st[j][r], l[r] = sum_j exp(st[j][r] - m[r]) (l = 0 where every logit is -inf).
// kStoreExps: each logit is also replaced by its exp(st[j][r] - m[r]), the block's probabilities
// up to a factor per row, for a pass that needs them again (no second exp).
template <bool kStoreExps = false>
SNAPKV_AI void block_row_stats(float* __restrict__ st, int64_t nb, int64_t ldr, int64_t n, float* __restrict__ m,
                               float* __restrict__ l) {
  for (int64_t r = 0; r < n; ++r) m[r] = -INFINITY;
  for (int64_t j = 0; j < nb; ++j) {
    const float* row = st + j * ldr;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) m[r] = row[r] > m[r] ? row[r] : m[r];
  }
  for (int64_t r = 0; r < n; ++r) l[r] = 0.f;
  for (int64_t j = 0; j < nb; ++j) {
    float* row = st + j * ldr;
#pragma omp simd
    for (int64_t r = 0; r < n; ++r) {
      const float e = exp_fast(row[r] - (m[r] == -INFINITY ? 0.f : m[r]));
      if constexpr (kStoreExps) row[r] = e;
      l[r] += e;
    }
  }
}

// sum over i < n of a[i] * b[i].
SNAPKV_AI float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// sum over i < n of exp(s[i] - m[i]) * inv_l[i]: the softmax probabilities of a row's logits
// given its max m and 1 / (sum of exp(x - m)). Relative error a few ulp whatever the logits'
// magnitude (exp(s - lse) would lose ulp(lse) of it).
SNAPKV_AI float sum_probs(const float* __restrict__ s, const float* __restrict__ m, const float* __restrict__ inv_l,
                          int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += exp_fast(s[i] - m[i]) * inv_l[i];
  return acc;
}

// y[j - j0] = pooled x over the whole window [j - k/2, j + k/2] for j in [j0, j1) (the caller
// keeps those windows inside x). Blocks of 64 outputs stay in registers across the k offsets.
template <class Isa>
SNAPKV_AI void pool_interior(Pooling mode, const float* __restrict__ x, int64_t j0, int64_t j1,
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
