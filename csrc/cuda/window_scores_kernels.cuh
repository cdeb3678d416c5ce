// Window scoring on tensor cores: the softmax votes of the window queries, per KV head, without
// ever writing the [B, H_q, w, L] attention matrix to global memory.
//
// The R = G * w window query rows of a KV head's group (G query heads of w rows each, head-major)
// are one matrix; a CTA holds a block of up to kMaxRowBlock of them in shared memory and streams
// its chunk of key tiles (kTK keys each, double-buffered with async copies when rows are 16-byte
// aligned) through WMMA: 16-bit inputs with fp32 accumulation, float32 inputs as 3xTF32 (each
// operand split into a TF32 high and low part; three products), so fp32 keeps fp32 accuracy.
// The logit tile [rows, kTK] goes to shared memory in fp32, where the softmax bookkeeping runs
// with the helpers of common.h (the CPU kernel's too), on the scaled logits, soft-capped first
// when the op has a cap (kernels built with kCap; the uncapped ones do no extra work):
//   1. stats:   grid (key chunks, B*H_kv): per row and chunk a partial (max, sum of exp).
//   2. combine: a warp per row merges its chunks' partials into the row's log-sum-exp.
//   3. votes:   grid (prefix chunks, B*H_kv): rescore, probabilities with the row's lse, mean
//               over each head's window rows, reduction over the group: out [B, H_kv, L - w].
// Each key is read from global memory once per pass when R <= the row block (every Llama/
// Mistral/Qwen GQA shape with w <= 32 and G <= 4, and all MHA shapes); otherwise once per row
// block. Bytes and FLOPs per op: benchmarks/RESULTS.md, roofline table.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdlib>
#include <type_traits>

#include "../common.h"
#include "../dispatch.h"
#include "kernel_support.cuh"

namespace snapkv {
namespace ws {

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTK = 64;                      // keys per tile
constexpr int kSLd = kTK + 8;                // logit tile row stride (floats): conflict-free column reads
constexpr int kMaxRowBlock = 128;            // query rows resident per CTA
constexpr int kMaxRowsPerWarp = kMaxRowBlock / kWarps;
constexpr int kColsPerThread = kTK / 32;     // stats: columns of a row per lane
constexpr int kThreadsPerCol = kThreads / kTK;  // votes: lanes sharing a column
constexpr int kMaxVoteTiles = 16;            // tiles per votes CTA (its accumulators live in smem)

struct Dims {
  int64_t L, w, D, G, R, N, Hkv;
  int64_t Dp;          // D rounded up to the MMA k step (zero-filled past D)
  int64_t ld;          // row stride of the query and key tiles in shared memory (elements)
  int64_t rows;        // query rows per CTA row block (multiple of 16)
  int64_t chunk;       // key tiles per CTA
  int64_t chunks;      // CTAs along the keys per KV head
  int async_rows;      // 1: key rows are 16-byte aligned, loaded with async copies
  int resident;        // 1: query fragments stay in registers (QFrags)
  float scale;
  float softcap;       // > 0 in the kernels built with kCap (0: no cap)
};

// The logit of a logit-tile entry (an unscaled dot product): scaled, then soft-capped in the
// kernels built with the cap. Both passes use it, so the votes see the statistics' logits.
template <bool kCap>
__device__ __forceinline__ float tile_logit(float dot, const Dims& dm) {
  const float x = dot * dm.scale;
  return kCap ? softcap_logit(x, dm.softcap) : x;
}

// Element types and the MMA of a warp unit: NR 16-row fragments of the query block against two
// 16-key fragments of the key tile (acc[r][c] += Q[rows of r] . K[keys of c]^T over Dp), per
// input dtype. Per k step a unit loads NR + 2 fragments for 2 * NR products: NR = 2 halves the
// shared-memory bytes per product of NR = 1 (used when the block has rows enough for it).
template <typename scalar_t>
struct Mma;

template <typename T16>
struct Mma16 {
  static constexpr int kK = 16;
  static constexpr int kMaxKSteps = 8;  // register-resident query fragments: D <= 128
  using T = T16;
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T16, nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T16, nvcuda::wmma::col_major>;
  using C = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  template <int NR, typename S>
  __device__ static void run(C (&acc)[NR][2], const S* q, const S* k0, const S* k1, int64_t ld, int64_t Dp) {
    const T16* qa = reinterpret_cast<const T16*>(q);
    const T16* kb0 = reinterpret_cast<const T16*>(k0);
    const T16* kb1 = reinterpret_cast<const T16*>(k1);
    A a[NR];
    B b;
    for (int64_t d = 0; d < Dp; d += kK) {
#pragma unroll
      for (int r = 0; r < NR; ++r) nvcuda::wmma::load_matrix_sync(a[r], qa + r * 16 * ld + d, static_cast<unsigned>(ld));
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        nvcuda::wmma::load_matrix_sync(b, (c == 0 ? kb0 : kb1) + d, static_cast<unsigned>(ld));
#pragma unroll
        for (int r = 0; r < NR; ++r) nvcuda::wmma::mma_sync(acc[r][c], a[r], b, acc[r][c]);
      }
    }
  }
};
template <>
struct Mma<c10::Half> : Mma16<__half> {};
template <>
struct Mma<c10::BFloat16> : Mma16<__nv_bfloat16> {};

// float32: 3xTF32. x = hi + lo with hi = tf32(x), lo = tf32(x - hi); x.y ~ hi.hi + hi.lo + lo.hi
// (the dropped lo.lo term is 2^-22 relative).
template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using Tf = nvcuda::wmma::precision::tf32;
  using A = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, Tf, nvcuda::wmma::row_major>;
  using B = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, Tf, nvcuda::wmma::col_major>;
  using C = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float>;
  template <typename Frag>
  __device__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int e = 0; e < Frag::num_elements; ++e) {
      const float x = hi.x[e];
      const float h = nvcuda::wmma::__float_to_tf32(x);
      hi.x[e] = h;
      lo.x[e] = nvcuda::wmma::__float_to_tf32(x - h);
    }
  }
  template <int NR>
  __device__ static void run(C (&acc)[NR][2], const float* q, const float* k0, const float* k1, int64_t ld,
                             int64_t Dp) {
    A a_hi[NR], a_lo[NR];
    B b_hi, b_lo;
    for (int64_t d = 0; d < Dp; d += kK) {
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        nvcuda::wmma::load_matrix_sync(a_hi[r], q + r * 16 * ld + d, static_cast<unsigned>(ld));
        split(a_hi[r], a_lo[r]);
      }
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        nvcuda::wmma::load_matrix_sync(b_hi, (c == 0 ? k0 : k1) + d, static_cast<unsigned>(ld));
        split(b_hi, b_lo);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          nvcuda::wmma::mma_sync(acc[r][c], a_lo[r], b_hi, acc[r][c]);
          nvcuda::wmma::mma_sync(acc[r][c], a_hi[r], b_lo, acc[r][c]);
          nvcuda::wmma::mma_sync(acc[r][c], a_hi[r], b_hi, acc[r][c]);
        }
      }
    }
  }
};

// Shared memory of both scoring kernels: query block, two key tiles, the fp32 logit tile, the
// block's row log-sum-exps (votes) and the votes' per-column accumulators.
struct Smem {
  size_t q, k0, k1, s, lse, acc_head, total, bytes;
  __host__ __device__ Smem(int64_t rows, int64_t ld, int64_t elem_bytes, int64_t vote_cols) {
    SmemCarver c;
    q = c.take<unsigned char>(rows * ld * elem_bytes);
    k0 = c.take<unsigned char>(kTK * ld * elem_bytes);
    k1 = c.take<unsigned char>(kTK * ld * elem_bytes);
    s = c.take<float>(rows * kSLd);
    lse = c.take<float>(rows);
    acc_head = c.take<float>(vote_cols);
    total = c.take<float>(vote_cols);
    bytes = c.offset;
  }
};

// Loads query rows [r0, r0 + n) of qg [R, D] into qs [rows, ld], zero past n rows and D columns.
template <typename scalar_t>
__device__ void load_queries(scalar_t* __restrict__ qs, const scalar_t* __restrict__ qg, int64_t r0, int64_t n,
                             const Dims& dm) {
  for (int64_t e = threadIdx.x; e < dm.rows * dm.Dp; e += blockDim.x) {
    const int64_t r = e / dm.Dp, d = e % dm.Dp;
    qs[r * dm.ld + d] = (r < n && d < dm.D) ? qg[(r0 + r) * dm.D + d] : static_cast<scalar_t>(0.f);
  }
}

// Zeroes columns [D, Dp) of a key tile: async copies never write them.
template <typename scalar_t>
__device__ void zero_key_pad(scalar_t* __restrict__ ks, const Dims& dm) {
  const int64_t pad = dm.Dp - dm.D;
  for (int64_t e = threadIdx.x; e < kTK * pad; e += blockDim.x)
    ks[(e / pad) * dm.ld + dm.D + e % pad] = static_cast<scalar_t>(0.f);
}

// Issues the loads of key rows [j0, j0 + kTK) of kh [L, D] (zero past j_end) into ks, as one
// committed async-copy group (rows 16-byte aligned) or plain loads.
template <typename scalar_t>
__device__ void issue_key_tile(scalar_t* __restrict__ ks, const scalar_t* __restrict__ kh, int64_t j0,
                               int64_t j_end, const Dims& dm) {
  if (dm.async_rows) {
    constexpr int64_t kVec = 16 / sizeof(scalar_t);
    const int64_t vecs = dm.D / kVec;
    for (int64_t e = threadIdx.x; e < kTK * vecs; e += blockDim.x) {
      const int64_t r = e / vecs, v = e % vecs, j = j0 + r;
      scalar_t* dst = ks + r * dm.ld + v * kVec;
      if (j < j_end) {
        __pipeline_memcpy_async(dst, kh + j * dm.D + v * kVec, 16);
      } else {
#pragma unroll
        for (int64_t t = 0; t < kVec; ++t) dst[t] = static_cast<scalar_t>(0.f);
      }
    }
  } else {
    for (int64_t e = threadIdx.x; e < kTK * dm.D; e += blockDim.x) {
      const int64_t r = e / dm.D, d = e % dm.D, j = j0 + r;
      ks[r * dm.ld + d] = j < j_end ? kh[j * dm.D + d] : static_cast<scalar_t>(0.f);
    }
  }
  __pipeline_commit();
}

// A warp unit's accumulators: NR 16-row fragments x two 16-key fragments, zeroed, and stored into
// the logit tile at row block rb (of NR * 16 rows) and key half `half`.
template <int NR, typename C>
__device__ void zero_unit(C (&acc)[NR][2]) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    nvcuda::wmma::fill_fragment(acc[r][0], 0.f);
    nvcuda::wmma::fill_fragment(acc[r][1], 0.f);
  }
}
template <int NR, typename C>
__device__ void store_unit(float* __restrict__ s, const C (&acc)[NR][2], int64_t rb, int64_t half) {
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      nvcuda::wmma::store_matrix_sync(s + (rb * NR + r) * 16 * kSLd + half * 32 + c * 16, acc[r][c], kSLd,
                                      nvcuda::wmma::mem_row_major);
}

// Logits of the resident query block against one key tile: s[rows, kTK] (unscaled, fp32).
// Warp units are (NR * 16 rows, 32-key half tile), dealt round-robin to the warps.
template <int NR, typename scalar_t>
__device__ void tile_logits_units(float* __restrict__ s, const scalar_t* __restrict__ qs,
                                  const scalar_t* __restrict__ ks, const Dims& dm) {
  using M = Mma<scalar_t>;
  const int warp = threadIdx.x / 32;
  const int64_t units = dm.rows / (16 * NR) * 2;
  for (int64_t u = warp; u < units; u += kWarps) {
    const int64_t rb = u / 2, half = u % 2;
    typename M::C acc[NR][2];
    zero_unit(acc);
    const scalar_t* k0 = ks + (half * 32) * dm.ld;
    M::run(acc, qs + rb * NR * 16 * dm.ld, k0, k0 + 16 * dm.ld, dm.ld, dm.Dp);
    store_unit(s, acc, rb, half);
  }
}

// Two-row-fragment units once the block has rows for a unit per warp with them (128 rows:
// 4 x 2 units), else one-fragment units (more units for the 8 warps).
template <typename scalar_t>
__device__ void tile_logits(float* __restrict__ s, const scalar_t* __restrict__ qs, const scalar_t* __restrict__ ks,
                            const Dims& dm) {
  if (dm.rows >= 128)
    tile_logits_units<2>(s, qs, ks, dm);
  else
    tile_logits_units<1>(s, qs, ks, dm);
}

// Register-resident query fragments (16-bit inputs, a 128-row block, D <= 128): warp u owns
// unit u (rows 32 * (u / 2) .. + 32, key half u % 2) for every tile of the row block and keeps
// its query fragments in registers, so a tile costs it only the two key fragments per k step:
// half the shared-memory bytes per product of tile_logits_units<2>. The empty primary template is
// what the kernels hold when the plan does not use it.
template <typename scalar_t, bool kOn>
struct QFrags {
  __device__ void load(const scalar_t*, const Dims&) {}
  __device__ void logits(float*, const scalar_t*, const Dims&) const {}
};
template <typename scalar_t>
struct QFrags<scalar_t, true> {
  using M = Mma<scalar_t>;
  typename M::A a[2][M::kMaxKSteps];
  // After the query block is in shared memory and visible to every thread.
  __device__ void load(const scalar_t* qs, const Dims& dm) {
    const int64_t rb = threadIdx.x / 32 / 2;
    const auto* q = reinterpret_cast<const typename M::T*>(qs) + rb * 32 * dm.ld;
#pragma unroll
    for (int ks = 0; ks < M::kMaxKSteps; ++ks) {
      if (ks * M::kK >= dm.Dp) break;  // uniform
#pragma unroll
      for (int r = 0; r < 2; ++r)
        nvcuda::wmma::load_matrix_sync(a[r][ks], q + r * 16 * dm.ld + ks * M::kK, static_cast<unsigned>(dm.ld));
    }
  }
  __device__ void logits(float* __restrict__ s, const scalar_t* __restrict__ ks, const Dims& dm) const {
    const int warp = threadIdx.x / 32;
    const int64_t rb = warp / 2, half = warp % 2;
    const auto* kb = reinterpret_cast<const typename M::T*>(ks) + half * 32 * dm.ld;
    typename M::C acc[2][2];
    zero_unit(acc);
    typename M::B b;
#pragma unroll
    for (int k = 0; k < M::kMaxKSteps; ++k) {
      if (k * M::kK >= dm.Dp) break;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        nvcuda::wmma::load_matrix_sync(b, kb + c * 16 * dm.ld + k * M::kK, static_cast<unsigned>(dm.ld));
#pragma unroll
        for (int r = 0; r < 2; ++r) nvcuda::wmma::mma_sync(acc[r][c], a[r][k], b, acc[r][c]);
      }
    }
    store_unit(s, acc, rb, half);
  }
};

// Loads a row block of queries into shared memory, and into registers when the plan keeps them
// there (a barrier first: the fragments are read from the whole block's stores).
template <typename scalar_t, bool kResident>
__device__ void load_query_block(scalar_t* __restrict__ qs, QFrags<scalar_t, kResident>& qf,
                                 const scalar_t* __restrict__ qg, int64_t r0, int64_t n, const Dims& dm) {
  load_queries(qs, qg, r0, n, dm);
  if (kResident) {
    __syncthreads();
    qf.load(qs, dm);
  }
}

// Streams key tiles [t0, t1) of kh through the resident query block; after each tile's logits
// are in `s` (and every thread can read them), calls epilogue(tile).
template <typename scalar_t, bool kResident, typename Epilogue>
__device__ void stream_tiles(unsigned char* smem, const Smem& lay, const QFrags<scalar_t, kResident>& qf,
                             const scalar_t* __restrict__ kh, int64_t t0, int64_t t1, int64_t j_end, const Dims& dm,
                             Epilogue&& epilogue) {
  const scalar_t* qs = reinterpret_cast<const scalar_t*>(smem + lay.q);
  // Two key buffers, selected by tile parity (no pointer array: it would live in local memory).
  scalar_t* const kb0 = reinterpret_cast<scalar_t*>(smem + lay.k0);
  scalar_t* const kb1 = reinterpret_cast<scalar_t*>(smem + lay.k1);
  float* s = reinterpret_cast<float*>(smem + lay.s);
  issue_key_tile(kb0, kh, t0 * kTK, j_end, dm);
  for (int64_t t = t0; t < t1; ++t) {
    const bool odd = ((t - t0) & 1) != 0;
    if (t + 1 < t1) {
      // The other buffer's last readers (tile t - 1's MMA) finished before the barrier after it.
      issue_key_tile(odd ? kb0 : kb1, kh, (t + 1) * kTK, j_end, dm);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();  // tile t is in shared memory; the previous epilogue is done with s
    if (kResident)
      qf.logits(s, odd ? kb1 : kb0, dm);
    else
      tile_logits(s, qs, odd ? kb1 : kb0, dm);
    __syncthreads();  // s holds tile t's logits
    epilogue(t);
  }
}

template <typename scalar_t, bool kResident, bool kCap>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* __restrict__ q,      // [B, H_kv, R, D] (query head kv*G + g, row g*w + i)
                 const scalar_t* __restrict__ keys,   // [B, H_kv, L, D]
                 const int64_t* __restrict__ pad,     // [B] or null
                 SoftmaxStat* __restrict__ partial,   // [B*H_kv, R, chunks]
                 Dims dm) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const Smem lay(dm.rows, dm.ld, sizeof(scalar_t), 0);
  scalar_t* qs = reinterpret_cast<scalar_t*>(smem + lay.q);
  const float* s = reinterpret_cast<const float*>(smem + lay.s);
  const int64_t bh = blockIdx.y, chunk = blockIdx.x;
  const int64_t p0 = pad ? pad[bh / dm.Hkv] : 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* kh = keys + bh * dm.L * dm.D;
  QFrags<scalar_t, kResident> qf;
  const int64_t t0 = chunk * dm.chunk, t1 = t0 + dm.chunk < ceil_div(dm.L, kTK) ? t0 + dm.chunk : ceil_div(dm.L, kTK);
  zero_key_pad(reinterpret_cast<scalar_t*>(smem + lay.k0), dm);
  zero_key_pad(reinterpret_cast<scalar_t*>(smem + lay.k1), dm);

  for (int64_t r0 = 0; r0 < dm.R; r0 += dm.rows) {
    const int64_t n = dm.R - r0 < dm.rows ? dm.R - r0 : dm.rows;
    load_query_block(qs, qf, q + bh * dm.R * dm.D, r0, n, dm);
    // Lane-private running statistics of the warp's rows (row warp + m * kWarps) over the
    // lane's columns; merged across lanes once, after the chunk.
    SoftmaxStat st[kMaxRowsPerWarp];
#pragma unroll
    for (int m = 0; m < kMaxRowsPerWarp; ++m) st[m] = stat_empty();
    // The window index of each row in 32 bits, from one 64-bit remainder per row block: a 64-bit
    // remainder is a call to a ~70-instruction subroutine (tools/kernel_report.py), and this one
    // was in the tile loop, per row.
    const int w = static_cast<int>(dm.w), r0w = static_cast<int>(r0 % dm.w);
    stream_tiles(smem, lay, qf, kh, t0, t1, dm.L, dm, [&](int64_t t) {
#pragma unroll
      for (int m = 0; m < kMaxRowsPerWarp; ++m) {
        const int rl = warp + m * kWarps;
        if (rl >= n) break;
        const int i = (r0w + rl) % w;
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) {
          const int col = lane + 32 * c;
          const int64_t j = t * kTK + col;
          if (j < dm.L && key_visible(j, i, dm.L, dm.w, p0))
            st[m] = stat_push(st[m], tile_logit<kCap>(s[rl * kSLd + col], dm));
        }
      }
    });
#pragma unroll
    for (int m = 0; m < kMaxRowsPerWarp; ++m) {
      const int64_t rl = warp + m * kWarps;
      if (rl >= n) break;  // uniform across the warp
      SoftmaxStat x = st[m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        x = stat_merge(x, SoftmaxStat{__shfl_xor_sync(0xffffffffu, x.m, off), __shfl_xor_sync(0xffffffffu, x.l, off)});
      if (lane == 0) partial[(bh * dm.R + r0 + rl) * dm.chunks + chunk] = x;
    }
    __syncthreads();  // the next row block rewrites the query block
  }
}

// One warp per row: merge the row's chunk partials into its log-sum-exp.
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const SoftmaxStat* __restrict__ partial,  // [rows, chunks]
                   float* __restrict__ lse,                  // [rows]
                   int64_t rows, int64_t chunks) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps exit together: rows are warp-aligned
  SoftmaxStat x = stat_empty();
  for (int64_t t = lane; t < chunks; t += 32) x = stat_merge(x, partial[row * chunks + t]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    x = stat_merge(x, SoftmaxStat{__shfl_xor_sync(0xffffffffu, x.m, off), __shfl_xor_sync(0xffffffffu, x.l, off)});
  if (lane == 0) lse[row] = stat_lse(x);
}

template <typename scalar_t, bool kResident, bool kCap>
__global__ void __launch_bounds__(kThreads)
    votes_kernel(const scalar_t* __restrict__ q,     // [B, H_kv, R, D]
                 const scalar_t* __restrict__ keys,  // [B, H_kv, L, D]
                 const int64_t* __restrict__ pad,    // [B] or null
                 const float* __restrict__ lse,      // [B*H_kv, R]
                 float* __restrict__ out,            // [B, H_kv, N]
                 Dims dm, GroupReduce reduce) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const Smem lay(dm.rows, dm.ld, sizeof(scalar_t), dm.chunk * kTK);
  scalar_t* qs = reinterpret_cast<scalar_t*>(smem + lay.q);
  const float* s = reinterpret_cast<const float*>(smem + lay.s);
  float* lse_s = reinterpret_cast<float*>(smem + lay.lse);
  float* acc_head = reinterpret_cast<float*>(smem + lay.acc_head);  // [chunk * kTK]: this head's rows so far
  float* total = reinterpret_cast<float*>(smem + lay.total);        // [chunk * kTK]: group reduction so far
  // In the reverse of the statistics pass's CTA order: its last key reads are still in L2.
  const int64_t bh = gridDim.y - 1 - blockIdx.y, chunk = gridDim.x - 1 - blockIdx.x;
  const int64_t p0 = pad ? pad[bh / dm.Hkv] : 0;
  const int col = threadIdx.x / kThreadsPerCol, sub = threadIdx.x % kThreadsPerCol;
  const scalar_t* kh = keys + bh * dm.L * dm.D;
  QFrags<scalar_t, kResident> qf;
  const int64_t t0 = chunk * dm.chunk, t1 = t0 + dm.chunk < ceil_div(dm.N, kTK) ? t0 + dm.chunk : ceil_div(dm.N, kTK);
  zero_key_pad(reinterpret_cast<scalar_t*>(smem + lay.k0), dm);
  zero_key_pad(reinterpret_cast<scalar_t*>(smem + lay.k1), dm);
  // Each column's accumulators belong to the lane group of that column: no barrier needed.
  if (sub == 0)
    for (int64_t t = 0; t < t1 - t0; ++t) {
      acc_head[t * kTK + col] = 0.f;
      total[t * kTK + col] = group_init(reduce);
    }

  for (int64_t r0 = 0; r0 < dm.R; r0 += dm.rows) {
    const int64_t n = dm.R - r0 < dm.rows ? dm.R - r0 : dm.rows, r1 = r0 + n;
    load_query_block(qs, qf, q + bh * dm.R * dm.D, r0, n, dm);
    for (int64_t r = threadIdx.x; r < n; r += blockDim.x) lse_s[r] = lse[bh * dm.R + r0 + r];
    stream_tiles(smem, lay, qf, kh, t0, t1, dm.N, dm, [&](int64_t t) {
      const int64_t j = t * kTK + col;
      // Prefix keys are visible to every window query, unless they are padding.
      const bool vis = j < dm.N && j >= p0;
      for (int64_t g = r0 / dm.w; g * dm.w < r1; ++g) {  // heads with rows in this block
        const int64_t lo = g * dm.w > r0 ? g * dm.w : r0, hi = (g + 1) * dm.w < r1 ? (g + 1) * dm.w : r1;
        float v = 0.f;
        for (int64_t r = lo + ((sub - lo) % kThreadsPerCol + kThreadsPerCol) % kThreadsPerCol; r < hi;
             r += kThreadsPerCol)
          v += vis ? prob_from_lse(tile_logit<kCap>(s[(r - r0) * kSLd + col], dm), lse_s[r - r0]) : 0.f;
#pragma unroll
        for (int off = 1; off < kThreadsPerCol; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (sub == 0) {
          const int64_t a = (t - t0) * kTK + col;
          if (hi == (g + 1) * dm.w) {  // the head's last rows: its window mean joins the group
            total[a] = group_combine(reduce, total[a], (acc_head[a] + v) / static_cast<float>(dm.w));
            acc_head[a] = 0.f;
          } else {
            acc_head[a] += v;
          }
        }
      }
    });
    __syncthreads();  // the next row block rewrites the query block and lse_s
  }
  if (sub == 0)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t * kTK + col;
      if (j < dm.N) out[bh * dm.N + j] = (j >= p0) ? group_finish(reduce, total[(t - t0) * kTK + col], dm.G) : 0.f;
    }
}

// ---- host side: the launch plan, shared by the CUDA launcher and the CPU simulator ----

// Register-resident query fragments exist for 16-bit inputs only (float32's 3xTF32 fragments
// would need four times the registers).
template <typename scalar_t>
constexpr bool kSixteenBit = sizeof(scalar_t) == 2;

struct Plan {
  Dims stats_dm, votes_dm;  // they differ in their chunk of key tiles
  LaunchShape stats, combine, votes;
};

// Plans the three launches for a problem shape (L > w) on a device with `sm_count` SMs and
// `max_smem` bytes of opt-in shared memory per block. Returns false if even the smallest row
// block does not fit (the head dim is too large for this device).
inline bool plan_window_scores(int64_t B, int64_t Hkv, int64_t L, int64_t w, int64_t D, int64_t G,
                               int64_t elem_bytes, bool rows_aligned, float scale, float softcap, int sm_count,
                               size_t max_smem, Plan* p, bool allow_resident = true) {
  Dims dm;
  dm.L = L;
  dm.w = w;
  dm.D = D;
  dm.G = G;
  dm.R = G * w;
  dm.N = L - w;
  dm.Hkv = Hkv;
  dm.Dp = round_up(D, 16);
  // +16 bytes per row: a row stride of an odd multiple of 16 bytes modulo 128, so the 8 rows a
  // fragment load reads at once hit 8 different 16-byte bank groups; rows stay 16-byte aligned
  // (async copies) and 16-row blocks 32-byte aligned (WMMA).
  dm.ld = dm.Dp + 16 / elem_bytes;
  dm.async_rows = rows_aligned && (D * elem_bytes) % 16 == 0;
  dm.scale = scale;
  dm.softcap = softcap;
  // Spread each KV head's keys over enough CTAs for about two waves.
  const int64_t bhs = B * Hkv;
  const int64_t ctas_per_bh = ceil_div(2 * static_cast<int64_t>(sm_count), bhs);
  const int64_t tiles = ceil_div(L, kTK), vtiles = ceil_div(dm.N, kTK);
  const int64_t chunk = ceil_div(tiles, ctas_per_bh);
  int64_t vchunk = ceil_div(vtiles, ctas_per_bh);
  vchunk = vchunk < kMaxVoteTiles ? vchunk : kMaxVoteTiles;
  dm.rows = 0;
  for (int64_t rows : {int64_t{128}, int64_t{64}, int64_t{32}, int64_t{16}}) {
    if (rows > kMaxRowBlock || (rows > 16 && rows / 2 >= round_up(dm.R, 16))) continue;  // no bigger than needed
    if (Smem(rows, dm.ld, elem_bytes, vchunk * kTK).bytes <= max_smem) {
      dm.rows = rows;
      break;
    }
  }
  if (dm.rows == 0) return false;
  dm.resident = allow_resident && elem_bytes == 2 && dm.rows == 128 && dm.Dp <= 128;
  p->stats_dm = dm;
  p->stats_dm.chunk = chunk;
  p->stats_dm.chunks = ceil_div(tiles, chunk);
  p->votes_dm = dm;
  p->votes_dm.chunk = vchunk;
  p->votes_dm.chunks = ceil_div(vtiles, vchunk);
  p->stats = LaunchShape{dim3(static_cast<unsigned>(p->stats_dm.chunks), static_cast<unsigned>(bhs)), dim3(kThreads),
                         Smem(dm.rows, dm.ld, elem_bytes, 0).bytes};
  p->combine = LaunchShape{dim3(static_cast<unsigned>(ceil_div(bhs * dm.R, kWarps))), dim3(kThreads), 0};
  p->votes = LaunchShape{dim3(static_cast<unsigned>(p->votes_dm.chunks), static_cast<unsigned>(bhs)), dim3(kThreads),
                         Smem(dm.rows, dm.ld, elem_bytes, vchunk * kTK).bytes};
  return true;
}

// The whole op on an executor (CudaExec or the simulator's): shapes checked by the caller.
template <class Exec>
at::Tensor window_scores_run(Exec& ex, const at::Tensor& q_window, const at::Tensor& keys,
                             const c10::optional<at::Tensor>& pad_lengths, GroupReduce reduce, float scale,
                             float softcap) {
  const int64_t B = q_window.size(0), Hq = q_window.size(1), w = q_window.size(2), D = q_window.size(3);
  const int64_t Hkv = keys.size(1), L = keys.size(2), G = Hq / Hkv;
  SNAPKV_CHECK(B * Hkv <= 65535, "B * H_kv must be at most 65535 for the CUDA kernels, got ", B * Hkv);
  // Query head kv*G + g is row g*w + i of KV head kv: a view, no copy, when q is contiguous.
  const at::Tensor q = q_window.contiguous().view({B, Hkv, G * w, D});
  const at::Tensor k = keys.contiguous();
  const at::Tensor pad = pad_lengths.has_value() ? pad_lengths->contiguous() : at::Tensor();
  const int64_t* pad_ptr = pad.defined() ? pad.data_ptr<int64_t>() : nullptr;
  const bool aligned = reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0;
  // SNAPKV_WS_RESIDENT=0 keeps the query fragments in shared memory (for A/B profiling: the
  // register-resident variant trades occupancy for half the shared-memory traffic).
  const char* resident_env = std::getenv("SNAPKV_WS_RESIDENT");
  const bool allow_resident = !(resident_env && resident_env[0] == '0');
  Plan p;
  SNAPKV_CHECK(plan_window_scores(B, Hkv, L, w, D, G, k.element_size(), aligned, scale, softcap, ex.sm_count(),
                                  ex.max_smem_optin(), &p, allow_resident),
               "head dim D = ", D, " is too large for the CUDA window_scores kernel on this device");
  auto f32 = keys.options().dtype(at::kFloat);
  const int64_t rows = B * Hkv * p.stats_dm.R;
  at::Tensor partial = at::empty({rows * p.stats_dm.chunks * 2}, f32);  // SoftmaxStat pairs
  at::Tensor lse = at::empty({rows}, f32);
  at::Tensor out = at::empty({B, Hkv, p.stats_dm.N}, f32);
  auto* pp = reinterpret_cast<SoftmaxStat*>(partial.data_ptr<float>());
  SNAPKV_DISPATCH_FLOATING(k.scalar_type(), "window_scores_cuda", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    // The capped or uncapped kernels, chosen here once (cap: a compile-time constant in them).
    auto run = [&](auto cap) {
      constexpr bool kCap = decltype(cap)::value;
      auto stats = p.stats_dm.resident ? stats_kernel<scalar_t, kSixteenBit<scalar_t>, kCap>
                                       : stats_kernel<scalar_t, false, kCap>;
      auto votes = p.votes_dm.resident ? votes_kernel<scalar_t, kSixteenBit<scalar_t>, kCap>
                                       : votes_kernel<scalar_t, false, kCap>;
      ex.launch("window_scores.stats", stats, p.stats, qp, kp, pad_ptr, pp, p.stats_dm);
      ex.launch("window_scores.combine", combine_kernel, p.combine, static_cast<const SoftmaxStat*>(pp),
                lse.data_ptr<float>(), rows, p.stats_dm.chunks);
      ex.launch("window_scores.votes", votes, p.votes, qp, kp, pad_ptr,
                static_cast<const float*>(lse.data_ptr<float>()), out.data_ptr<float>(), p.votes_dm, reduce);
    };
    if (softcap > 0.f)
      run(std::true_type{});
    else
      run(std::false_type{});
  });
  return out;
}

}  // namespace ws
}  // namespace snapkv
