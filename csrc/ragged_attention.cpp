// CPU ragged attention: the n new queries of every query head against its KV head's segment of a
// flat, ragged store (decoding with per-head budgets), causal, with an online softmax.
//
// Work items are (batch row, KV head, key split). A KV head's G query heads x n new tokens are
// one block of R = G * n query rows, so every key and value row is loaded once per item and
// used by all R rows. When B * H_kv is small against the thread count, each segment is split
// into a few key ranges (flash-decoding on the CPU): the items keep partial (max, sum, acc) and
// a second pass merges them by log-sum-exp. Per block of kBlock keys:
//   logits  S[r][j] = (scale * q_r) . k_j, four (row, key) dot products at a time over D in
//           16-lane fp32 vectors, reduced together (one transpose-add tree for four sums);
//   softmax the (capped, masked) block's max and exp with cpu_math.h's exp_fast, the running
//           statistics and accumulators rescaled when the max moves;
//   values  acc[r] += p[r][j] * v_j, register tiles of (rows x 16-lane chunks), v_j loaded once
//           per tile. bfloat16/float16 keys and values are widened in the loads.
// On a path with kBlasAttention (the portable one, cpu_isa.h) float32 items take their logits
// (S = Q K^T) and values (acc += P V) from the BLAS torch ships, on blocks of up to a whole
// segment (the call overhead amortised; the scratch bounded by kBlasScratch floats per thread):
// SSE2 without FMA cannot stream keys as fast as MKL's AVX2 kernels (RESULTS.md section 15).
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "cpu_math.h"
#include "cpu_parallel.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {
namespace {

constexpr int64_t kBlock = 64;           // keys per softmax block
constexpr int64_t kBlasScratch = 1 << 18;  // floats of logits per thread on the BLAS path
// An item takes the BLAS path from this many keys on: below, the calls' overhead (two dispatched
// matrix products per block) costs more than the vector loops lose (SmolLM2's decode at 1K keys,
// split three ways: 0.92x SDPA through the BLAS).
constexpr int64_t kBlasMinKeys = 1024;
constexpr int64_t kMinSplitKeys = 256;   // a key split is at least this long
// Vectors of a path's width W = Isa::kLanes (16 on AVX-512, 8 on AVX2, 4 on the baseline).
template <class Isa>
using vf = typename Isa::vec;
template <int W>
struct LaneTypes;
#ifdef SNAPKV_HAVE_FLOAT16
#define SNAPKV_LANE_TYPES(W)                                                   \
  template <>                                                                  \
  struct LaneTypes<W> {                                                        \
    typedef uint32_t u32 __attribute__((vector_size(4 * W)));                  \
    typedef uint16_t u16 __attribute__((vector_size(2 * W)));                  \
    typedef _Float16 f16 __attribute__((vector_size(2 * W)));                  \
  };
#else
#define SNAPKV_LANE_TYPES(W)                                                   \
  template <>                                                                  \
  struct LaneTypes<W> {                                                        \
    typedef uint32_t u32 __attribute__((vector_size(4 * W)));                  \
    typedef uint16_t u16 __attribute__((vector_size(2 * W)));                  \
  };
#endif
SNAPKV_LANE_TYPES(4)
SNAPKV_LANE_TYPES(8)
SNAPKV_LANE_TYPES(16)
template <class Isa>
using vu32 = typename LaneTypes<Isa::kLanes>::u32;
template <class Isa>
using vu16 = typename LaneTypes<Isa::kLanes>::u16;
#ifdef SNAPKV_HAVE_FLOAT16
template <class Isa>
using vf16 = typename LaneTypes<Isa::kLanes>::f16;
#endif

// Element types as the loads see them: float, bfloat16 as raw bits, float16 as cpu::Half16.
using cpu::Half16;

template <typename T>
SNAPKV_AI float widen1(const T* p) {
  return cpu::widen<T>(*p);
}

// W consecutive elements as fp32 (no alignment assumed).
template <class Isa, typename T>
SNAPKV_AI vf<Isa> loadw(const T* p) {
  vf<Isa> v;
  if constexpr (std::is_same_v<T, float>) {
    __builtin_memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<T, uint16_t>) {
    vu16<Isa> x;
    __builtin_memcpy(&x, p, sizeof(x));
    const vu32<Isa> w = __builtin_convertvector(x, vu32<Isa>) << 16;  // bf16 = the high half of fp32
    __builtin_memcpy(&v, &w, sizeof(v));
  } else {
#ifdef SNAPKV_HAVE_FLOAT16
    vf16<Isa> x;
    __builtin_memcpy(&x, p, sizeof(x));
    v = __builtin_convertvector(x, vf<Isa>);
#else
    for (int i = 0; i < Isa::kLanes; ++i) v[i] = static_cast<float>(p[i]);
#endif
  }
  return v;
}

// Chunk c (W lanes) of a row. With kPair (bfloat16, D % 32 == 0) the lanes are a fixed
// permutation of the elements: chunk 2g holds the even elements of the row's 2W-element group g,
// chunk 2g + 1 the odd ones, each widened by a shift or a mask of the group's 32-bit pairs (no
// shuffle). Queries and accumulators use the same permutation (perm_index), so dot products
// and the value sums are unchanged; the output is written back in element order.
template <class Isa, typename T, bool kPair>
SNAPKV_AI vf<Isa> load_chunk(const T* row, int64_t c) {
  if constexpr (kPair) {
    vu32<Isa> w;
    __builtin_memcpy(&w, row + (c >> 1) * 2 * Isa::kLanes, sizeof(w));
    w = (c & 1) ? (w & 0xffff0000u) : (w << 16);
    vf<Isa> v;
    __builtin_memcpy(&v, &w, sizeof(v));
    return v;
  } else {
    return loadw<Isa, T>(row + c * Isa::kLanes);
  }
}

// Where element d of a row sits in the (possibly permuted) fp32 query / accumulator layout of a
// path with W lanes.
inline int64_t perm_index(int64_t d, bool pair, int64_t W) {
  return pair ? (d & ~(2 * W - 1)) + (d & 1) * W + ((d & (2 * W - 1)) >> 1) : d;
}

// The lane sums of four vectors at once: out[t] = sum of a_t's lanes. On AVX-512 a transpose-add
// tree (8 shuffles and 5 adds for the four, instead of 4 x (4 shuffles + 4 adds)); elsewhere one
// lane sum per vector (hsum).
template <class Isa>
SNAPKV_AI float hsum(vf<Isa> a) {
  float s = 0.f;
#pragma GCC unroll 16
  for (int i = 0; i < Isa::kLanes; ++i) s += a[i];
  return s;
}

template <class Isa>
SNAPKV_AI void hsum4(vf<Isa> a0, vf<Isa> a1, vf<Isa> a2, vf<Isa> a3, float* out) {
  if constexpr (Isa::kLanes == 16) {
    typedef vf<Isa> v16;
    const v16 x01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const v16 x23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    // Lanes 4t..4t+3: four partial sums of a_t.
    v16 y = __builtin_shufflevector(x01, x23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
            __builtin_shufflevector(x01, x23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    y += __builtin_shufflevector(y, y, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    y += __builtin_shufflevector(y, y, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    out[0] = y[0];
    out[1] = y[4];
    out[2] = y[8];
    out[3] = y[12];
  } else {
    out[0] = hsum<Isa>(a0);
    out[1] = hsum<Isa>(a1);
    out[2] = hsum<Isa>(a2);
    out[3] = hsum<Isa>(a3);
  }
}

// Software prefetch of one row (the next block's), line by line: with one query row (MHA) there is
// too little work per byte for the hardware prefetcher to keep DRAM busy on its own.
template <typename T>
SNAPKV_AI void prefetch_row(const T* p, int64_t D) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

// One work item's geometry and buffers.
struct Item {
  int64_t R, Rp, D, Dp, Dc;   // rows, rows rounded up to 4, head dim, D rounded up to 16, full W-lane chunks
  int64_t n;                  // new tokens per query head (row r is token r % n)
  int64_t seg_len;            // the segment's length
  int64_t k0, k1;             // this item's key range inside the segment
  float softcap;              // 0: none
  const float* q;             // [Rp, Dp] scaled queries, zero-padded
  float* s;                   // [Rp, sb] logits, then probabilities
  int64_t sb;                 // keys per block: kBlock, or a BLAS block (then also s's row stride)
  bool blas;                  // logits and values through the BLAS (float32 on a kBlasAttention path)
  float* acc;                 // [Rp, Dp] unnormalised output
  float* m;                   // [R] running max
  float* l;                   // [R] running sum
};

// Logits of rows [0, Rp) against keys [0, nb) of k (row stride ks): four or eight (row, key) pairs per
// unit, RG rows x KJ keys.
template <class Isa, int RG, int KJ, bool kPair, typename T>
SNAPKV_AI void block_logits(const Item& it, const T* __restrict__ k, int64_t ks, int64_t nb) {
  constexpr int U = RG * KJ;
  static_assert(U == 4 || U == 8, "a unit is four or eight dot products");
  for (int64_t r0 = 0; r0 < it.Rp; r0 += RG) {
    for (int64_t j0 = 0; j0 < nb; j0 += KJ) {
      const T* kr[KJ];
#pragma GCC unroll 8
      for (int jj = 0; jj < KJ; ++jj) kr[jj] = k + (j0 + jj < nb ? j0 + jj : j0) * ks;
      if (r0 == 0)
#pragma GCC unroll 8
        for (int jj = 0; jj < KJ; ++jj) prefetch_row(kr[jj] + kBlock * ks, it.D);
      vf<Isa> acc[U] = {};
      for (int64_t c = 0; c < it.Dc; ++c) {
        vf<Isa> kv[KJ];
#pragma GCC unroll 8
        for (int jj = 0; jj < KJ; ++jj) kv[jj] = load_chunk<Isa, T, kPair>(kr[jj], c);
#pragma GCC unroll 4
        for (int rr = 0; rr < RG; ++rr) {
          const vf<Isa> qv = loadw<Isa, float>(it.q + (r0 + rr) * it.Dp + c * Isa::kLanes);
#pragma GCC unroll 8
          for (int jj = 0; jj < KJ; ++jj) acc[rr * KJ + jj] += qv * kv[jj];
        }
      }
      float dot[U];
#pragma GCC unroll 2
      for (int u = 0; u < U; u += 4) hsum4<Isa>(acc[u], acc[u + 1], acc[u + 2], acc[u + 3], dot + u);
      for (int64_t d = it.Dc * Isa::kLanes; d < it.D; ++d) {  // head-dim tail (D % W)
#pragma GCC unroll 4
        for (int rr = 0; rr < RG; ++rr)
#pragma GCC unroll 8
          for (int jj = 0; jj < KJ; ++jj) dot[rr * KJ + jj] += it.q[(r0 + rr) * it.Dp + d] * widen1<T>(kr[jj] + d);
      }
#pragma GCC unroll 4
      for (int rr = 0; rr < RG; ++rr)
#pragma GCC unroll 8
        for (int jj = 0; jj < KJ; ++jj)
          if (j0 + jj < nb) it.s[(r0 + rr) * it.sb + j0 + jj] = dot[rr * KJ + jj];
    }
  }
}

// acc[r0 + rr] += sum_j p[r0 + rr][j] * v_j for RT rows, in register tiles of RT x (kAcc / RT)
// chunks: kAcc accumulators, 16 of AVX-512's 32 registers, 12 of the 16 elsewhere.
template <class Isa, int RT, bool kPair, typename T>
SNAPKV_AI void block_values_rows(const Item& it, int64_t r0, const T* __restrict__ v, int64_t vs, int64_t nb) {
  constexpr int kAcc = Isa::kLanes == 16 ? 16 : 12;
  constexpr int CT = kAcc / RT;
  for (int64_t c0 = 0; c0 < it.Dc; c0 += CT) {
    vf<Isa> a[RT][CT] = {};
#pragma GCC unroll 16
    for (int cc = 0; cc < CT; ++cc)
#pragma GCC unroll 4
      for (int rr = 0; rr < RT; ++rr)
        if (c0 + cc < it.Dc) a[rr][cc] = loadw<Isa, float>(it.acc + (r0 + rr) * it.Dp + (c0 + cc) * Isa::kLanes);
    for (int64_t j = 0; j < nb; ++j) {
      float p[RT];
#pragma GCC unroll 4
      for (int rr = 0; rr < RT; ++rr) p[rr] = it.s[(r0 + rr) * it.sb + j];
      const T* vr = v + j * vs;
      if (r0 == 0 && c0 == 0) prefetch_row(vr + kBlock * vs, it.D);
#pragma GCC unroll 16
      for (int cc = 0; cc < CT; ++cc) {
        if (c0 + cc < it.Dc) {
          const vf<Isa> vv = load_chunk<Isa, T, kPair>(vr, c0 + cc);
#pragma GCC unroll 4
          for (int rr = 0; rr < RT; ++rr) a[rr][cc] += p[rr] * vv;
        }
      }
    }
#pragma GCC unroll 16
    for (int cc = 0; cc < CT; ++cc)
#pragma GCC unroll 4
      for (int rr = 0; rr < RT; ++rr)
        if (c0 + cc < it.Dc)
          __builtin_memcpy(it.acc + (r0 + rr) * it.Dp + (c0 + cc) * Isa::kLanes, &a[rr][cc], sizeof(a[rr][cc]));
  }
  for (int64_t d = it.Dc * Isa::kLanes; d < it.D; ++d)  // head-dim tail (D % W)
    for (int rr = 0; rr < RT; ++rr) {
      float x = it.acc[(r0 + rr) * it.Dp + d];
      for (int64_t j = 0; j < nb; ++j) x += it.s[(r0 + rr) * it.sb + j] * widen1<T>(v + j * vs + d);
      it.acc[(r0 + rr) * it.Dp + d] = x;
    }
}

// Soft-cap, causal mask and online-softmax update of rows [0, R) for keys [j0, j0 + nb) of the
// segment: s becomes the probabilities (relative to the new running max), acc is rescaled.
SNAPKV_AI void block_softmax(const Item& it, int64_t j0, int64_t nb) {
  for (int64_t r = 0; r < it.R; ++r) {
    float* sr = it.s + r * it.sb;
    // Token i of n sees segment entries [0, seg_len - n + i].
    const int64_t visible = it.seg_len - it.n + r % it.n + 1 - j0;
    const int64_t nv = visible < 0 ? 0 : (visible > nb ? nb : visible);
    if (it.softcap > 0.f) {
#pragma omp simd
      for (int64_t j = 0; j < nv; ++j) sr[j] = softcap_logit(sr[j], it.softcap, cpu::ExpFast{});
    }
    float bm = -INFINITY;
#pragma omp simd reduction(max : bm)
    for (int64_t j = 0; j < nv; ++j) bm = sr[j] > bm ? sr[j] : bm;
    const float m_new = bm > it.m[r] ? bm : it.m[r];
    if (m_new == -INFINITY) {  // nothing visible yet (or a NaN-free empty block)
      for (int64_t j = 0; j < nb; ++j) sr[j] = 0.f;
      continue;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < nb; ++j) {
      const float p = j < nv ? cpu::exp_fast(sr[j] - m_new) : 0.f;
      sr[j] = p;
      sum += p;
    }
    const float alpha = cpu::exp_fast(it.m[r] - m_new);  // 0 when m was -inf
    if (alpha != 1.f) {
      float* ar = it.acc + r * it.Dp;
#pragma omp simd
      for (int64_t d = 0; d < it.Dp; ++d) ar[d] *= alpha;
    }
    it.l[r] = it.l[r] * alpha + sum;
    it.m[r] = m_new;
  }
}

// The BLAS products of a block of nb keys (rows of stride ks / vs): s[R, nb] = q k^T (s packed
// at row stride nb = it.sb), then acc[R, D] += p v. Called from a worker of the parallel loop: the
// BLAS runs single-threaded there.
void blas_logits(const Item& it, const float* k, int64_t ks, int64_t nb) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor s = at::from_blob(it.s, {it.R, nb}, {nb, 1}, f32);
  at::mm_out(s, at::from_blob(const_cast<float*>(it.q), {it.R, it.D}, {it.Dp, 1}, f32),
             at::from_blob(const_cast<float*>(k), {it.D, nb}, {1, ks}, f32));
}
void blas_values(const Item& it, const float* v, int64_t vs, int64_t nb) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor acc = at::from_blob(it.acc, {it.R, it.D}, {it.Dp, 1}, f32);
  acc.addmm_(at::from_blob(it.s, {it.R, nb}, {nb, 1}, f32),
             at::from_blob(const_cast<float*>(v), {nb, it.D}, {vs, 1}, f32));
}

// The item's keys [k0, k1) of the segment at k / v (row strides ks / vs), into acc, m, l.
template <class Isa, bool kPair, typename T>
SNAPKV_AI void run_item(const Item& it, const T* __restrict__ k, int64_t ks, const T* __restrict__ v, int64_t vs) {
  if constexpr (Isa::kBlasAttention && std::is_same_v<T, float>) {
    if (it.blas) {
      for (int64_t j0 = it.k0; j0 < it.k1; j0 += it.sb) {
        Item b = it;
        b.sb = std::min(it.sb, it.k1 - j0);  // s packed: [R, nb]
        blas_logits(b, k + j0 * ks, ks, b.sb);
        block_softmax(b, j0, b.sb);
        blas_values(b, v + j0 * vs, vs, b.sb);
      }
      return;
    }
  }
  for (int64_t j0 = it.k0; j0 < it.k1; j0 += kBlock) {
    const int64_t nb = std::min(kBlock, it.k1 - j0);
    const T* kb = k + j0 * ks;
    // Units of 4 dot products on AVX-512 (4 accumulator chains of 16 lanes); of 8 on the narrower
    // paths, whose 4-chain units wait on the FMA (or add) latency.
    constexpr int kU = Isa::kLanes == 16 ? 1 : 2;
    if (it.R >= 3)
      block_logits<Isa, 4, kU, kPair>(it, kb, ks, nb);
    else if (it.R == 2)
      block_logits<Isa, 2, 2 * kU, kPair>(it, kb, ks, nb);
    else
      block_logits<Isa, 1, 4 * kU, kPair>(it, kb, ks, nb);
    block_softmax(it, j0, nb);
    const T* vb = v + j0 * vs;
    int64_t r0 = 0;
    for (; r0 + 4 <= it.R; r0 += 4) block_values_rows<Isa, 4, kPair>(it, r0, vb, vs, nb);
    switch (it.R - r0) {
      case 3: block_values_rows<Isa, 3, kPair>(it, r0, vb, vs, nb); break;
      case 2: block_values_rows<Isa, 2, kPair>(it, r0, vb, vs, nb); break;
      case 1: block_values_rows<Isa, 1, kPair>(it, r0, vb, vs, nb); break;
      default: break;
    }
  }
}

// Compiled per CPU path (cpu_isa.h); one per element type.
template <class Isa>
SNAPKV_AI void run_item_f32_impl(const Item& it, const float* k, int64_t ks, const float* v, int64_t vs) {
  run_item<Isa, false, float>(it, k, ks, v, vs);
}
template <class Isa>
SNAPKV_AI void run_item_bf16_impl(const Item& it, const uint16_t* k, int64_t ks, const uint16_t* v, int64_t vs) {
  if (it.D % 32 == 0)
    run_item<Isa, true, uint16_t>(it, k, ks, v, vs);
  else
    run_item<Isa, false, uint16_t>(it, k, ks, v, vs);
}
template <class Isa>
SNAPKV_AI void run_item_f16_impl(const Item& it, const Half16* k, int64_t ks, const Half16* v, int64_t vs) {
  run_item<Isa, false, Half16>(it, k, ks, v, vs);
}
SNAPKV_CPU_VARIANTS(void, run_item_f32, run_item_f32_impl,
                    (const Item& it, const float* k, int64_t ks, const float* v, int64_t vs), (it, k, ks, v, vs))
SNAPKV_CPU_VARIANTS(void, run_item_bf16, run_item_bf16_impl,
                    (const Item& it, const uint16_t* k, int64_t ks, const uint16_t* v, int64_t vs), (it, k, ks, v, vs))
SNAPKV_CPU_VARIANTS(void, run_item_f16, run_item_f16_impl,
                    (const Item& it, const Half16* k, int64_t ks, const Half16* v, int64_t vs), (it, k, ks, v, vs))

template <typename scalar_t>
void run_item_typed(cpu::Isa isa, const Item& it, const scalar_t* k, int64_t ks, const scalar_t* v, int64_t vs) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    run_item_f32_for(isa)(it, k, ks, v, vs);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    run_item_bf16_for(isa)(it, reinterpret_cast<const uint16_t*>(k), ks, reinterpret_cast<const uint16_t*>(v), vs);
  } else {
    run_item_f16_for(isa)(it, reinterpret_cast<const Half16*>(k), ks, reinterpret_cast<const Half16*>(v), vs);
  }
}

int64_t ceil_div_i(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up_to(int64_t x, int64_t m) { return ceil_div_i(x, m) * m; }

}  // namespace

at::Tensor ragged_attention_cpu(const RaggedShape& sh, const at::Tensor& q, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& starts_in, const at::Tensor& lengths_in,
                                double scale_d, c10::optional<double> softcap_opt) {
  const int64_t B = sh.B, Hkv = sh.Hkv, G = sh.group(), n = sh.n, D = sh.D;
  // One CPU path for the whole call: the query layout (W-lane chunks) is that path's.
  const cpu::Isa isa = cpu::active_isa();
  const int64_t W = cpu::isa_lanes(isa);
  const int64_t R = G * n, Rp = round_up_to(R, 4), Dp = round_up_to(D, 16), BH = B * Hkv;
  const float scale = static_cast<float>(scale_d);
  const float softcap = resolve_softcap(softcap_opt);
  const at::Tensor starts = starts_in.contiguous(), lengths = lengths_in.contiguous();
  // bfloat16 rows of whole 32-element groups use the pair layout (load_chunk).
  const bool pair = q.scalar_type() == at::kBFloat16 && D % 32 == 0;
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* ln = lengths.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t i = 0; i < BH; ++i) max_len = std::max(max_len, ln[i]);

  // Key splits: enough items for every thread when there are few segments.
  const int64_t threads = at::get_num_threads();
  int64_t splits = 1;
  if (threads > 1 && BH < 4 * threads)
    splits = std::max<int64_t>(1, std::min(ceil_div_i(4 * threads, BH), max_len / kMinSplitKeys));
  const int64_t items = BH * splits;
  // Keys per block: kBlock, or on a BLAS path (float32) up to an item's whole range (sb_max: the
  // longest, within kBlasScratch); an item shorter than kBlasMinKeys keeps the vector loops.
  const bool blas_path = cpu::isa_blas_attention(isa) && q.scalar_type() == at::kFloat;
  int64_t sb_max = kBlock;
  if (blas_path) {
    const int64_t cap = std::max(kBlock, kBlasScratch / Rp / kBlock * kBlock);
    sb_max = std::min(cap, std::max(kBlock, round_up_to(ceil_div_i(max_len, splits), kBlock)));
  }
  at::Tensor out = at::empty({B, sh.Hq, n, D}, q.options());
  // Partials of split items: acc [items, Rp, Dp], then (m, l) [items, R, 2].
  std::vector<float> part(splits > 1 ? items * (Rp * Dp + 2 * R) : 0);

  SNAPKV_DISPATCH_FLOATING(q.scalar_type(), "ragged_attention_cpu", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = keys.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t ks = keys.stride(0), vs = values.stride(0);
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);

    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qbuf(Rp * Dp), sbuf(Rp * sb_max), own(splits > 1 ? 0 : Rp * Dp + 2 * R);
      int64_t loaded = -1;  // the bh whose queries qbuf holds
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / splits, split = item % splits, b = bh / Hkv, h = bh % Hkv;
        const int64_t seg = ln[bh];
        const int64_t chunk = round_up_to(ceil_div_i(seg, splits), kBlock);
        float* acc = splits > 1 ? part.data() + item * (Rp * Dp + 2 * R) : own.data();
        const int64_t k0 = std::min(seg, split * chunk), k1 = std::min(seg, (split + 1) * chunk);
        const bool blas = blas_path && k1 - k0 >= kBlasMinKeys;
        Item it{R, Rp, D, Dp, D / W, n, seg, k0, k1, softcap, qbuf.data(), sbuf.data(), blas ? sb_max : kBlock, blas,
                acc, acc + Rp * Dp, acc + Rp * Dp + R};
        if (loaded != bh) {  // scaled fp32 queries, rows g * n + i, zero-padded
          std::fill(qbuf.begin(), qbuf.end(), 0.f);
          for (int64_t r = 0; r < R; ++r) {
            const scalar_t* qr = qp + b * qs0 + (h * G + r / n) * qs1 + (r % n) * qs2;
            for (int64_t d = 0; d < D; ++d) qbuf[r * Dp + perm_index(d, pair, W)] = static_cast<float>(qr[d]) * scale;
          }
          loaded = bh;
        }
        std::fill(acc, acc + Rp * Dp, 0.f);
        std::fill(it.m, it.m + R, -INFINITY);
        std::fill(it.l, it.l + R, 0.f);
        run_item_typed<scalar_t>(isa, it, kp + st[bh] * ks, ks, vp + st[bh] * vs, vs);
        if (splits == 1) {
          scalar_t* ob = op + bh * R * D;  // out[b, h * G + g, i] is row g * n + i of KV head bh
          for (int64_t r = 0; r < R; ++r) {
            const float inv = 1.f / it.l[r];
            for (int64_t d = 0; d < D; ++d) ob[r * D + d] = static_cast<scalar_t>(acc[r * Dp + perm_index(d, pair, W)] * inv);
          }
        }
      }
    });

    if (splits > 1) {
      // Merge each row's splits by log-sum-exp (serial when small: a parallel region costs more).
      const int64_t per_bh = R * D * splits;
      at::parallel_for(0, BH, std::max<int64_t>(1, 65536 / per_bh), [&](int64_t begin, int64_t end) {
        std::vector<float> w(splits);
        for (int64_t bh = begin; bh < end; ++bh) {
          scalar_t* ob = op + bh * R * D;
          for (int64_t r = 0; r < R; ++r) {
            SoftmaxStat tot = stat_empty();
            for (int64_t sp = 0; sp < splits; ++sp) {
              const float* base = part.data() + (bh * splits + sp) * (Rp * Dp + 2 * R) + Rp * Dp;
              tot = stat_merge(tot, SoftmaxStat{base[r], base[R + r]});
            }
            for (int64_t sp = 0; sp < splits; ++sp) {
              const float m = part[(bh * splits + sp) * (Rp * Dp + 2 * R) + Rp * Dp + r];
              w[sp] = m == -INFINITY ? 0.f : std::exp(m - tot.m) / tot.l;
            }
            for (int64_t d = 0; d < D; ++d) {
              float x = 0.f;
              for (int64_t sp = 0; sp < splits; ++sp)
                x += w[sp] * part[(bh * splits + sp) * (Rp * Dp + 2 * R) + r * Dp + perm_index(d, pair, W)];
              ob[r * D + d] = static_cast<scalar_t>(x);
            }
          }
        }
      });
    }
  });
  return out;
}

}  // namespace snapkv
