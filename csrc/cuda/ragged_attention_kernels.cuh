// CUDA ragged attention (the CPU kernel: ragged_attention.cpp): the n new queries of every query
// head against its KV head's segment of a flat store, causal, flash-decoding style.
//
// A CTA owns one (batch row, KV head), a block of up to kMaxRows of its R = G * n query rows
// (every query head of the GQA group, every new token: each key and value row is read from
// global memory once per row block, i.e. once when R <= kMaxRows, all decode shapes) and one
// split of the segment's keys. It streams its keys in tiles of kTK rows, converted to fp32 in
// shared memory (16-byte loads when every row start is 16-byte aligned, scalar loads otherwise):
//   logits  one thread per (row, key): (scale * q_r) . k_j over D, soft-capped in the kCap build;
//   softmax one warp per row: the tile's statistics with common.h's stat_push / stat_merge, the
//           running (max, sum) in shared memory, probabilities written over the logits;
//   values  one thread per (row, d): acc = acc * alpha + sum_j p_j v_j[d] in shared memory.
// With one split per segment the CTA writes the normalised output. When B * H_kv is small
// against the SM count the segment is split over several CTAs (about two waves): each writes its
// partial (max, sum, unnormalised acc) and the combine kernel merges them by log-sum-exp.
// Bytes and FLOPs: benchmarks/roofline.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../common.h"
#include "../dispatch.h"
#include "../snapkv.h"
#include "kernel_support.cuh"

namespace snapkv {
namespace ra {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTK = 32;               // keys per tile: one per lane in the softmax step
constexpr int64_t kMaxRows = 32;      // query rows per CTA
constexpr int64_t kMinTilesPerSplit = 4;

struct Dims {
  int64_t Hkv, G, n, D, R;
  int64_t rows;             // query rows per CTA (the last row block may hold fewer)
  int64_t splits;           // CTAs along each segment
  int64_t tiles_per_split;  // key tiles per split
  int64_t qs0, qs1, qs2;    // q strides (elements); q's last dim is contiguous
  int64_t ks, vs;           // row strides of keys and values (elements)
  int vec;                  // 1: 16-byte loads of key/value rows
  float scale;
  float softcap;            // > 0 in the kernels built with kCap
};

// Shared memory of the main kernel: scaled queries, the fp32 key tile (row stride D + 1: the
// logits step reads 32 keys at one d without bank conflicts), the value tile, logits, the rows'
// running statistics and rescale factors, and the accumulators.
struct Smem {
  size_t q, k, v, s, m, l, alpha, acc, bytes;
  __host__ __device__ Smem(int64_t rows, int64_t D) {
    SmemCarver c;
    q = c.take<float>(rows * D);
    k = c.take<float>(kTK * (D + 1));
    v = c.take<float>(kTK * D);
    s = c.take<float>(rows * kTK);
    m = c.take<float>(rows);
    l = c.take<float>(rows);
    alpha = c.take<float>(rows);
    acc = c.take<float>(rows * D);
    bytes = c.offset;
  }
};

template <typename scalar_t>
struct alignas(16) Pack16 {
  scalar_t x[16 / sizeof(scalar_t)];
};

// Rows [j0, j0 + nk) of a segment (row stride ld) into a fp32 tile [kTK, tld], zero past nk.
template <typename scalar_t>
__device__ void load_tile(float* __restrict__ dst, int64_t tld, const scalar_t* __restrict__ src, int64_t ld,
                          int64_t nk, const Dims& dm) {
  if (dm.vec) {
    constexpr int64_t kVec = 16 / sizeof(scalar_t);
    const int64_t vecs = dm.D / kVec;
    for (int64_t e = threadIdx.x; e < kTK * vecs; e += blockDim.x) {
      const int64_t j = e / vecs, c = e % vecs;
      float* o = dst + j * tld + c * kVec;
      if (j < nk) {
        const Pack16<scalar_t> p = *reinterpret_cast<const Pack16<scalar_t>*>(src + j * ld + c * kVec);
#pragma unroll
        for (int64_t t = 0; t < kVec; ++t) o[t] = static_cast<float>(p.x[t]);
      } else {
#pragma unroll
        for (int64_t t = 0; t < kVec; ++t) o[t] = 0.f;
      }
    }
  } else {
    for (int64_t e = threadIdx.x; e < kTK * dm.D; e += blockDim.x) {
      const int64_t j = e / dm.D, d = e % dm.D;
      dst[j * tld + d] = j < nk ? static_cast<float>(src[j * ld + d]) : 0.f;
    }
  }
}

template <typename scalar_t, bool kCap>
__global__ void __launch_bounds__(kThreads)
    attend_kernel(const scalar_t* __restrict__ q,       // [B, H_q, n, D] strided (dm.qs*)
                  const scalar_t* __restrict__ keys,    // [N, D], row stride dm.ks
                  const scalar_t* __restrict__ values,  // [N, D], row stride dm.vs
                  const int64_t* __restrict__ starts,   // [B * H_kv]
                  const int64_t* __restrict__ lengths,  // [B * H_kv]
                  scalar_t* __restrict__ out,           // [B, H_q, n, D] contiguous (splits == 1)
                  float* __restrict__ part_acc,         // [B * H_kv, splits, R, D] (splits > 1)
                  SoftmaxStat* __restrict__ part_stat,  // [B * H_kv, splits, R]     (splits > 1)
                  Dims dm) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const Smem lay(dm.rows, dm.D);
  float* qs = reinterpret_cast<float*>(smem + lay.q);
  float* ks = reinterpret_cast<float*>(smem + lay.k);
  float* vs = reinterpret_cast<float*>(smem + lay.v);
  float* s = reinterpret_cast<float*>(smem + lay.s);
  float* m_s = reinterpret_cast<float*>(smem + lay.m);
  float* l_s = reinterpret_cast<float*>(smem + lay.l);
  float* alpha_s = reinterpret_cast<float*>(smem + lay.alpha);
  float* acc = reinterpret_cast<float*>(smem + lay.acc);
  const int64_t split = blockIdx.x, bh = blockIdx.y, r0 = blockIdx.z * dm.rows;
  const int64_t nr = dm.R - r0 < dm.rows ? dm.R - r0 : dm.rows;
  const int64_t b = bh / dm.Hkv, h = bh % dm.Hkv, D = dm.D;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t seg = lengths[bh];
  const scalar_t* kh = keys + starts[bh] * dm.ks;
  const scalar_t* vh = values + starts[bh] * dm.vs;
  const int64_t span = dm.tiles_per_split * kTK;
  const int64_t j_begin = split * span < seg ? split * span : seg;
  const int64_t j_end = j_begin + span < seg ? j_begin + span : seg;

  // Row r (of the block) is new token (r0 + r) % n of query head h * G + (r0 + r) / n.
  for (int64_t e = threadIdx.x; e < nr * D; e += blockDim.x) {
    const int64_t r = r0 + e / D, d = e % D;
    qs[e] = static_cast<float>(q[b * dm.qs0 + (h * dm.G + r / dm.n) * dm.qs1 + (r % dm.n) * dm.qs2 + d]) * dm.scale;
    acc[e] = 0.f;
  }
  for (int64_t r = threadIdx.x; r < nr; r += blockDim.x) {
    m_s[r] = -INFINITY;
    l_s[r] = 0.f;
  }
  __syncthreads();

  for (int64_t t0 = j_begin; t0 < j_end; t0 += kTK) {
    const int64_t nk = j_end - t0 < kTK ? j_end - t0 : kTK;
    load_tile(ks, D + 1, kh + t0 * dm.ks, dm.ks, nk, dm);
    load_tile(vs, D, vh + t0 * dm.vs, dm.vs, nk, dm);
    __syncthreads();
    for (int64_t p = threadIdx.x; p < nr * kTK; p += blockDim.x) {
      const int64_t r = p / kTK, j = p % kTK;
      const float* qr = qs + r * D;
      const float* kr = ks + j * (D + 1);
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
      s[p] = kCap ? softcap_logit(dot, dm.softcap) : dot;
    }
    __syncthreads();
    for (int64_t r = warp; r < nr; r += kWarps) {  // a warp per row, a lane per key
      const int64_t i = (r0 + r) % dm.n;
      const bool vis = lane < nk && t0 + lane <= seg - dm.n + i;
      const float x = vis ? s[r * kTK + lane] : -INFINITY;
      SoftmaxStat t = stat_push(stat_empty(), x);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        t = stat_merge(t, SoftmaxStat{__shfl_xor_sync(0xffffffffu, t.m, off), __shfl_xor_sync(0xffffffffu, t.l, off)});
      const SoftmaxStat old{m_s[r], l_s[r]};
      const SoftmaxStat now = stat_merge(old, t);
      s[r * kTK + lane] = vis ? expf(x - now.m) : 0.f;
      __syncwarp();
      if (lane == 0) {
        alpha_s[r] = old.m == -INFINITY ? 0.f : expf(old.m - now.m);
        m_s[r] = now.m;
        l_s[r] = now.l;
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < nr * D; e += blockDim.x) {
      const int64_t r = e / D, d = e % D;
      const float* pr = s + r * kTK;
      float a = acc[e] * alpha_s[r];
      for (int64_t j = 0; j < nk; ++j) a += pr[j] * vs[j * D + d];
      acc[e] = a;
    }
    __syncthreads();  // the next tile overwrites keys, values and logits
  }

  const int64_t row0 = bh * dm.R + r0;  // the block's first row of KV head bh
  if (dm.splits == 1) {
    for (int64_t e = threadIdx.x; e < nr * D; e += blockDim.x)
      out[row0 * D + e] = static_cast<scalar_t>(acc[e] / l_s[e / D]);
  } else {
    const int64_t prow0 = (bh * dm.splits + split) * dm.R + r0;
    for (int64_t e = threadIdx.x; e < nr * D; e += blockDim.x) part_acc[prow0 * D + e] = acc[e];
    for (int64_t r = threadIdx.x; r < nr; r += blockDim.x) part_stat[prow0 + r] = SoftmaxStat{m_s[r], l_s[r]};
  }
}

// A CTA per output row (of B * H_kv * R): merges the row's split partials by log-sum-exp.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const float* __restrict__ part_acc, const SoftmaxStat* __restrict__ part_stat,
                   scalar_t* __restrict__ out, Dims dm) {
  const int64_t row = blockIdx.x, bh = row / dm.R, r = row % dm.R;
  const int64_t base = bh * dm.splits * dm.R + r;  // partial row of split sp: base + sp * R
  SoftmaxStat tot = stat_empty();
  for (int64_t sp = 0; sp < dm.splits; ++sp) tot = stat_merge(tot, part_stat[base + sp * dm.R]);
  for (int64_t d = threadIdx.x; d < dm.D; d += blockDim.x) {
    float x = 0.f;
    for (int64_t sp = 0; sp < dm.splits; ++sp) {
      const SoftmaxStat st = part_stat[base + sp * dm.R];
      if (st.m != -INFINITY) x += part_acc[(base + sp * dm.R) * dm.D + d] * expf(st.m - tot.m);
    }
    out[row * dm.D + d] = static_cast<scalar_t>(x / tot.l);
  }
}

// ---- host side: the launch plan, shared by the CUDA launcher and the CPU simulator ----

struct Plan {
  Dims dm;
  LaunchShape attend, combine;
};

// Plans the launches for B * H_kv segments of at most max_len keys, R = G * n rows, on a device
// with sm_count SMs and max_smem opt-in bytes per block. False if no row block fits (D too large).
inline bool plan_ragged_attention(int64_t B, int64_t Hkv, int64_t G, int64_t n, int64_t D, int64_t max_len,
                                  int sm_count, size_t max_smem, Plan* p) {
  Dims dm{};
  dm.Hkv = Hkv;
  dm.G = G;
  dm.n = n;
  dm.D = D;
  dm.R = G * n;
  dm.rows = 0;
  for (int64_t rows = dm.R < kMaxRows ? dm.R : kMaxRows; rows >= 1; rows /= 2)
    if (Smem(rows, D).bytes <= max_smem) {
      dm.rows = rows;
      break;
    }
  if (dm.rows == 0) return false;
  const int64_t row_blocks = ceil_div(dm.R, dm.rows);
  const int64_t tiles = ceil_div(max_len > 0 ? max_len : 1, kTK);
  // About two waves of CTAs, each with at least kMinTilesPerSplit tiles.
  const int64_t ctas_per_seg = ceil_div(2 * static_cast<int64_t>(sm_count), B * Hkv * row_blocks);
  int64_t per = ceil_div(tiles, ctas_per_seg);
  per = per > kMinTilesPerSplit ? per : kMinTilesPerSplit;
  dm.tiles_per_split = per;
  dm.splits = ceil_div(tiles, per);
  p->dm = dm;
  p->attend = LaunchShape{dim3(static_cast<unsigned>(dm.splits), static_cast<unsigned>(B * Hkv),
                               static_cast<unsigned>(row_blocks)),
                          dim3(kThreads), Smem(dm.rows, D).bytes};
  p->combine = LaunchShape{dim3(static_cast<unsigned>(B * Hkv * dm.R)), dim3(kThreads), 0};
  return true;
}

inline bool rows_16b(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * es) % 16 == 0 &&
         (t.size(1) * es) % 16 == 0;
}

// The whole op on an executor (CudaExec or the simulator's); arguments checked by the caller
// (s.max_len from the value check, or -1: then the store size N bounds the segments).
template <class Exec>
at::Tensor ragged_attention_run(Exec& ex, const RaggedShape& s, const at::Tensor& q, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& starts_in, const at::Tensor& lengths_in,
                                float scale, float softcap) {
  SNAPKV_CHECK(s.B * s.Hkv <= 65535, "B * H_kv must be at most 65535 for the CUDA kernels, got ", s.B * s.Hkv);
  const at::Tensor starts = starts_in.contiguous(), lengths = lengths_in.contiguous();
  Plan p;
  SNAPKV_CHECK(plan_ragged_attention(s.B, s.Hkv, s.group(), s.n, s.D, s.max_len >= 0 ? s.max_len : s.N,
                                     ex.sm_count(), ex.max_smem_optin(), &p),
               "head dim D = ", s.D, " is too large for the CUDA ragged_attention kernel on this device");
  SNAPKV_CHECK(p.attend.grid.z <= 65535, "too many query rows per KV head for the CUDA kernel: G * n = ", p.dm.R);
  p.dm.qs0 = q.stride(0);
  p.dm.qs1 = q.stride(1);
  p.dm.qs2 = q.stride(2);
  p.dm.ks = keys.stride(0);
  p.dm.vs = values.stride(0);
  p.dm.vec = rows_16b(keys) && rows_16b(values);
  p.dm.scale = scale;
  p.dm.softcap = softcap;
  at::Tensor out = at::empty({s.B, s.Hq, s.n, s.D}, q.options());
  const bool split = p.dm.splits > 1;
  auto f32 = q.options().dtype(at::kFloat);
  const int64_t prows = split ? s.B * s.Hkv * p.dm.splits * p.dm.R : 0;
  at::Tensor part_acc = at::empty({prows * s.D}, f32);
  at::Tensor part_stat = at::empty({prows * 2}, f32);  // SoftmaxStat pairs
  float* pa = split ? part_acc.data_ptr<float>() : nullptr;
  auto* ps = split ? reinterpret_cast<SoftmaxStat*>(part_stat.data_ptr<float>()) : nullptr;
  SNAPKV_DISPATCH_FLOATING(q.scalar_type(), "ragged_attention_cuda", [&] {
    auto run = [&](auto cap) {
      constexpr bool kCap = decltype(cap)::value;
      ex.launch("ragged_attention.attend", attend_kernel<scalar_t, kCap>, p.attend,
                static_cast<const scalar_t*>(q.data_ptr<scalar_t>()),
                static_cast<const scalar_t*>(keys.data_ptr<scalar_t>()),
                static_cast<const scalar_t*>(values.data_ptr<scalar_t>()),
                static_cast<const int64_t*>(starts.data_ptr<int64_t>()),
                static_cast<const int64_t*>(lengths.data_ptr<int64_t>()), out.data_ptr<scalar_t>(), pa, ps, p.dm);
    };
    if (softcap > 0.f)
      run(std::true_type{});
    else
      run(std::false_type{});
    if (split)
      ex.launch("ragged_attention.combine", combine_kernel<scalar_t>, p.combine, static_cast<const float*>(pa),
                static_cast<const SoftmaxStat*>(ps), out.data_ptr<scalar_t>(), p.dm);
  });
  return out;
}

}  // namespace ra
}  // namespace snapkv
