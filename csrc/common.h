// Per-element math shared by the CPU and CUDA kernels.
//
// Everything here is `SNAPKV_HD`: compiled for the host in the CPU kernels (which the CPU test
// suite exercises on every run) and for the device in the CUDA kernels. Keeping the masking,
// softmax bookkeeping, pooling windows and top-k ordering in one place means a CUDA kernel that
// has never run on a GPU still computes exactly what the CPU tests checked.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define SNAPKV_HD __host__ __device__ __forceinline__
#else
#define SNAPKV_HD inline
#endif

namespace snapkv {

// Reduction over the query heads of one GQA group (step 3 of SNAPKV.md).
enum class GroupReduce : int { Mean = 0, Max = 1, Sum = 2 };
// 1-D pooling over positions (step 4).
enum class Pooling : int { Max = 0, Avg = 1 };

SNAPKV_HD float neg_inf() { return -INFINITY; }

// Window query `i` (0-based inside a window of `w`) sits at absolute position L - w + i and
// sees key `j` iff j is not left padding and j <= L - w + i (causal inside the window).
SNAPKV_HD bool key_visible(int64_t j, int64_t i, int64_t L, int64_t w, int64_t pad) {
  return j >= pad && j <= L - w + i;
}

// exp for the helpers that take one: expf by default (CUDA, the simulator); the CPU's vector
// loops pass cpu_math.h's exp_fast, so the same formula vectorises there.
struct ExpF {
  SNAPKV_HD float operator()(float x) const { return expf(x); }
};

// a / b for the soft-cap's two divisions: on the GPU the fast division (__fdividef: a times an
// approximate reciprocal, 2 ulp; 0 when |b| > 2^126, e.g. an overflowed exp, as the exact one
// gives there), not IEEE division's slow-path call per logit; the simulator models it as
// a * (1 / b); the CPU divides exactly (its vector loops divide with one instruction).
SNAPKV_HD float softcap_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#elif defined(SNAPKV_CUDA_SIM)
  return fabsf(b) > 8.50705917e37f ? 0.f : a * (1.f / b);  // 2^126: the reciprocal flushes to 0
#else
  return a / b;
#endif
}

// Attention logit soft-capping (Gemma 2): softcap * tanh(x / softcap) of the scaled logit x,
// before the mask and the softmax, as Transformers' eager attention does. The ops take
// `softcap=None` for no cap, held as 0 inside; the kernels pick their capped or uncapped loops
// once, outside the per-element work, so only softcap > 0 reaches this.
// tanh, branch-free so that a CPU loop vectorises it (libm's tanhf does not: 2.7-5.8x slower):
// below |y| = 0.4 its Taylor series to y^15 (the next term is < 1e-9 relative there), above it
// 1 - 2 / (exp(2|y|) + 1). Within 4 ulp of float64 tanh; NaN stays NaN, +-inf gives +-softcap.
template <typename Exp = ExpF>
SNAPKV_HD float softcap_logit(float x, float softcap, Exp exp = Exp()) {
  const float y = softcap_div(x, softcap);
  const float a = fabsf(y);
  const float z = y * y;
  float series = -929569.f / 638512875.f;
  series = series * z + 21844.f / 6081075.f;
  series = series * z - 1382.f / 155925.f;
  series = series * z + 62.f / 2835.f;
  series = series * z - 17.f / 315.f;
  series = series * z + 2.f / 15.f;
  series = series * z - 1.f / 3.f;
  series = (series * z + 1.f) * y;
  const float tail = copysignf(1.f - softcap_div(2.f, exp(2.f * a) + 1.f), y);
  return softcap * (a < 0.4f ? series : tail);
}

// Running softmax statistics of one row: max `m` and sum of exp(x - m) `l`.
struct SoftmaxStat {
  float m;
  float l;
};

SNAPKV_HD SoftmaxStat stat_empty() { return SoftmaxStat{-INFINITY, 0.f}; }

// Merge two partial statistics (either may be empty).
SNAPKV_HD SoftmaxStat stat_merge(SoftmaxStat a, SoftmaxStat b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const float m = a.m > b.m ? a.m : b.m;
  return SoftmaxStat{m, a.l * expf(a.m - m) + b.l * expf(b.m - m)};
}

// Adds one logit to a row's statistics (one exp); a masked logit (-inf) changes nothing.
SNAPKV_HD SoftmaxStat stat_push(SoftmaxStat s, float x) {
  if (x == -INFINITY) return s;
  if (x > s.m) return SoftmaxStat{x, s.l * expf(s.m - x) + 1.f};
  return SoftmaxStat{s.m, s.l + expf(x - s.m)};
}

// log-sum-exp of a row from its statistics; -inf for a row that saw no key.
SNAPKV_HD float stat_lse(SoftmaxStat s) {
  return s.m == -INFINITY ? -INFINITY : s.m + logf(s.l);
}

// Softmax probability of a logit given the row's log-sum-exp (0 for an empty row).
SNAPKV_HD float prob_from_lse(float logit, float lse) {
  return lse == -INFINITY ? 0.f : expf(logit - lse);
}

// Group reduction: start value, combine one head's window-averaged score, finish.
SNAPKV_HD float group_init(GroupReduce r) { return r == GroupReduce::Max ? -INFINITY : 0.f; }
SNAPKV_HD float group_combine(GroupReduce r, float acc, float v) {
  return r == GroupReduce::Max ? (v > acc ? v : acc) : acc + v;
}
SNAPKV_HD float group_finish(GroupReduce r, float acc, int64_t group) {
  return r == GroupReduce::Mean ? acc / static_cast<float>(group) : acc;
}

// Pooling window of output position j: inputs [lo, hi) (clipped to the sequence). Padding is
// kernel_size // 2 on each side, stride 1, so the output has the input's length.
SNAPKV_HD void pool_bounds(int64_t j, int64_t n, int64_t kernel_size, int64_t* lo, int64_t* hi) {
  const int64_t half = kernel_size / 2;
  *lo = j - half < 0 ? 0 : j - half;
  *hi = j + half + 1 > n ? n : j + half + 1;
}
SNAPKV_HD float pool_init(Pooling p) { return p == Pooling::Max ? -INFINITY : 0.f; }
SNAPKV_HD float pool_combine(Pooling p, float acc, float v) {
  // NaN propagates through max pooling, as in F.max_pool1d.
  return p == Pooling::Max ? ((v > acc || v != v) ? v : acc) : acc + v;
}
// Average pooling divides by the full kernel size (count_include_pad=True, as F.avg_pool1d).
SNAPKV_HD float pool_finish(Pooling p, float acc, int64_t kernel_size) {
  return p == Pooling::Avg ? acc / static_cast<float>(kernel_size) : acc;
}

// Top-k order as an unsigned key: a larger key ranks first. The one ranking rule of every
// implementation (reference, CPU, CUDA): by value, -inf below every finite score, NaN below
// everything (-inf included), +0 and -0 equal; ties go to the lower position (the selection
// code's `need`, not the key). Monotone in the value for every non-NaN.
SNAPKV_HD uint32_t order_key(float v) {
  if (v != v) return 0u;
  if (v == 0.f) v = 0.f;  // -0 -> +0: equal scores, so the lower position wins the tie
  union {
    float f;
    uint32_t u;
  } bits;
  bits.f = v;
  const uint32_t u = bits.u;
  // Positive floats: set the sign bit; negative floats: flip every bit. Keys of NaN-free input
  // are then >= 0x007FFFFF + 1 for -inf, so key 0 is free for NaN.
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Whether bin `bin`, holding `count` candidates with `above` candidates in the bins above it, is
// the one that holds the need-th best candidate (need >= 1 and at most all candidates): exactly
// one bin answers true, and need - above is then what is still to be taken from it. Used bin by
// bin (radix_pick_bin, the CPU) and by one thread per bin in parallel (the CUDA top-k).
SNAPKV_HD bool radix_bin_takes(int bin, int64_t above, int64_t count, int64_t need) {
  return above < need && (above + count >= need || bin == 0);
}

// Radix select over order keys, 8 bits a pass from the most significant digit. `hist` counts the
// current digit of the candidates (keys whose higher digits equal the prefix chosen so far) and
// `need` (>= 1) is how many keys are still to be taken from the candidates. Returns the digit
// whose bin holds the need-th best candidate and lowers `need` by the candidates in higher
// bins, which are all taken. After four passes the prefix is the k-th best key T: every key
// above T is selected, plus the first `need` keys equal to T in position order.
SNAPKV_HD int radix_pick_bin(const uint32_t* hist, int64_t* need) {
  int64_t above = 0;
  for (int bin = 255;; --bin) {
    if (radix_bin_takes(bin, above, hist[bin], *need)) {
      *need -= above;
      return bin;
    }
    above += hist[bin];
  }
}

}  // namespace snapkv
