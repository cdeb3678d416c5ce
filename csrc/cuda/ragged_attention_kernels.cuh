// CUDA ragged attention (the CPU kernel: ragged_attention.cpp): the n new queries of every query
// head against its KV head's segment of a flat store, causal, flash-decoding style.
//
// A CTA owns one (batch row, KV head), a block of up to kMaxRows of its R = G * n query rows
// (every query head of the GQA group, every new token: each key and value row is read from
// global memory once per row block, i.e. once when R <= kMaxRows, all decode shapes) and one
// split of the segment's keys. It streams its keys in tiles of kTK rows, converted to fp32 in
// shared memory (16-byte loads when every row start is 16-byte aligned, scalar loads otherwise).
// Per tile, three barriers (and one before the first):
//   load    the tile into shared memory: from registers where the next tile was prefetched (16-byte
//           rows, at most kMaxPacks packs per thread: bf16/fp16 D <= 128, fp32 D <= 64; its
//           global loads are in flight while the CTA computes the current tile), else straight
//           from global memory;
//   logits  one warp per row, one lane per key: (scale * q_r) . k_j over D, four-wide from shared
//           memory when D % 4 == 0 (four accumulators), soft-capped in the kCap build; then, in
//           the same warp, the tile's softmax statistics (common.h's stat_push / stat_merge over
//           the lanes), the running (max, sum) in shared memory, probabilities for the values;
//   values  one thread per (row, d): acc = acc * alpha + sum_j p_j v_j[d] in shared memory.
// Index math inside a CTA is 32-bit (the tile, the rows and D are small): no 64-bit division.
// With one split per segment the CTA writes the normalised output. When B * H_kv is small
// against the SM count the segment is split over several CTAs (about two waves): each writes its
// partial (max, sum, unnormalised acc) and the combine kernel merges them by log-sum-exp.
// Bytes and FLOPs: benchmarks/roofline.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
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
constexpr int kMaxPacks = 4;          // 16-byte packs per thread per tile held in registers to prefetch

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

// Row stride of the fp32 key tile: D + 4 when D % 4 == 0 (16-byte rows for four-wide reads; the 8
// lanes of a quarter warp read 8 rows 4 banks apart: no conflict), else D + 1 (scalar reads of 32
// keys at one d: no conflict).
__host__ __device__ __forceinline__ int64_t key_ld(int64_t D) { return D % 4 == 0 ? D + 4 : D + 1; }

// Shared memory of the main kernel: scaled queries, the fp32 key tile, the value tile,
// probabilities, the rows' running statistics and rescale factors, and the accumulators.
struct Smem {
  size_t q, k, v, s, m, l, alpha, acc, bytes;
  __host__ __device__ Smem(int64_t rows, int64_t D) {
    SmemCarver c;
    q = c.take<float>(rows * D);
    k = c.take<float>(kTK * key_ld(D));
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

struct alignas(16) F4 {
  float x[4];
};

// Rows [j0, j0 + nk) of a segment (row stride ld) into a fp32 tile [kTK, tld], zero past nk.
template <typename scalar_t>
__device__ void load_tile(float* __restrict__ dst, int tld, const scalar_t* __restrict__ src, int64_t ld, int nk,
                          int D, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int vecs = D / kVec;
    for (int e = threadIdx.x; e < kTK * vecs; e += blockDim.x) {
      const int j = e / vecs, c = e - j * vecs;
      float* o = dst + j * tld + c * kVec;
      if (j < nk) {
        const Pack16<scalar_t> p = *reinterpret_cast<const Pack16<scalar_t>*>(src + j * ld + c * kVec);
#pragma unroll
        for (int t = 0; t < kVec; ++t) o[t] = static_cast<float>(p.x[t]);
      } else {
#pragma unroll
        for (int t = 0; t < kVec; ++t) o[t] = 0.f;
      }
    }
  } else {
    for (int e = threadIdx.x; e < kTK * D; e += blockDim.x) {
      const int j = e / D, d = e - j * D;
      dst[j * tld + d] = j < nk ? static_cast<float>(src[j * ld + d]) : 0.f;
    }
  }
}

// A tile's 16-byte packs held in registers by one thread, loaded ahead of their use: with vecs
// packs per row dividing kThreads, thread t holds pack t % vecs of rows t / vecs + u * (kThreads /
// vecs), u < kTK * vecs / kThreads <= kMaxPacks (one division per tile, none per pack).
// (The packs are held as raw 32-bit words, converted when stored: kept as 16-bit float objects
// across the tile's compute, ptxas put fp16 ones in local memory.)
struct alignas(16) Raw16 {
  uint32_t w[4];
};

template <typename scalar_t>
struct TileRegs {
  Raw16 p[kMaxPacks];

  // Element t of a pack as fp32, from its bits (no reinterpretation of the registers as memory).
  static __device__ __forceinline__ float unpack(const Raw16& r, int t) {
    if constexpr (sizeof(scalar_t) == 4) {
      return static_cast<float>(*reinterpret_cast<const scalar_t*>(&r.w[t]));
    } else {
      const uint32_t w = r.w[t / 2];
      const uint16_t bits = static_cast<uint16_t>(t % 2 ? w >> 16 : w & 0xffffu);
      return static_cast<float>(scalar_t(bits, scalar_t::from_bits()));
    }
  }

  __device__ void load(const scalar_t* __restrict__ src, int64_t ld, int nk, int vecs) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int c = threadIdx.x % vecs, j0 = threadIdx.x / vecs, step = kThreads / vecs;
#pragma unroll
    for (int u = 0; u < kMaxPacks; ++u) {
      const int j = j0 + u * step;
      const bool in = j < kTK && j < nk;
      const Raw16* at = reinterpret_cast<const Raw16*>(src + (in ? j * ld + c * kVec : 0));
      p[u] = *at;  // every pack assigned (row 0, unused, past the tile's keys): no predicated copy
    }
  }

  __device__ void store(float* __restrict__ dst, int tld, int nk, int vecs) const {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int c = threadIdx.x % vecs, j0 = threadIdx.x / vecs, step = kThreads / vecs;
#pragma unroll
    for (int u = 0; u < kMaxPacks; ++u) {
      const int j = j0 + u * step;
      if (j >= kTK) continue;
      float* o = dst + j * tld + c * kVec;
#pragma unroll
      for (int t = 0; t < kVec; ++t) o[t] = j < nk ? unpack(p[u], t) : 0.f;
    }
  }
};

// Whether the tiles prefetch through registers: 16-byte rows whose vecs packs divide kThreads, at
// most kMaxPacks per thread (bf16/fp16 D = 64 or 128, fp32 D = 32 or 64).
__device__ __forceinline__ bool prefetches(bool vec, int vecs) {
  return vec && vecs > 0 && kThreads % vecs == 0 && kTK * vecs <= kMaxPacks * kThreads;
}

// At least 4 CTAs per SM (at most 128 registers): the plan launches about two waves, and with the
// bound ptxas holds the prefetched packs in registers (without it, it capped itself at 64 and
// spilled one pack per tile; at 6 CTAs, 80 registers, it spilled too).
template <typename scalar_t, bool kCap>
__global__ void __launch_bounds__(kThreads, 4)
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
  const int64_t split = blockIdx.x, bh = blockIdx.y;
  const int D = static_cast<int>(dm.D), n = static_cast<int>(dm.n), Hkv = static_cast<int>(dm.Hkv);
  const int kld = static_cast<int>(key_ld(dm.D));
  const int r0 = static_cast<int>(blockIdx.z * dm.rows), R = static_cast<int>(dm.R);
  const int nr = R - r0 < dm.rows ? R - r0 : static_cast<int>(dm.rows);
  const int b = static_cast<int>(blockIdx.y) / Hkv, h = static_cast<int>(blockIdx.y) - b * Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t seg = lengths[bh];
  const scalar_t* kh = keys + starts[bh] * dm.ks;
  const scalar_t* vh = values + starts[bh] * dm.vs;
  const int64_t span = dm.tiles_per_split * kTK;
  const int64_t j_begin = split * span < seg ? split * span : seg;
  const int64_t j_end = j_begin + span < seg ? j_begin + span : seg;
  const bool four = D % 4 == 0;
  const int vecs = D / static_cast<int>(16 / sizeof(scalar_t));
  const bool ahead = prefetches(dm.vec != 0, vecs);

  // Row r (of the block) is new token (r0 + r) % n of query head h * G + (r0 + r) / n.
  for (int e = threadIdx.x; e < nr * D; e += blockDim.x) {
    const int rl = e / D, d = e - rl * D, r = r0 + rl;
    const int qh = h * static_cast<int>(dm.G) + r / n;
    qs[e] = static_cast<float>(q[b * dm.qs0 + qh * dm.qs1 + (r % n) * dm.qs2 + d]) * dm.scale;
    acc[e] = 0.f;
  }
  for (int r = threadIdx.x; r < nr; r += blockDim.x) {
    m_s[r] = -INFINITY;
    l_s[r] = 0.f;
  }

  TileRegs<scalar_t> kreg, vreg;
  if (ahead && j_begin < j_end) {
    const int nk = j_end - j_begin < kTK ? static_cast<int>(j_end - j_begin) : kTK;
    kreg.load(kh + j_begin * dm.ks, dm.ks, nk, vecs);
    vreg.load(vh + j_begin * dm.vs, dm.vs, nk, vecs);
  }
  __syncthreads();  // the queries and statistics are in (also for a split with no key)
  for (int64_t t0 = j_begin; t0 < j_end; t0 += kTK) {
    const int nk = j_end - t0 < kTK ? static_cast<int>(j_end - t0) : kTK;
    if (ahead) {
      kreg.store(ks, kld, nk, vecs);
      vreg.store(vs, D, nk, vecs);
      const int64_t t1 = t0 + kTK;  // the next tile's loads are in flight while this one is computed
      if (t1 < j_end) {
        const int nk1 = j_end - t1 < kTK ? static_cast<int>(j_end - t1) : kTK;
        kreg.load(kh + t1 * dm.ks, dm.ks, nk1, vecs);
        vreg.load(vh + t1 * dm.vs, dm.vs, nk1, vecs);
      }
    } else {
      load_tile(ks, kld, kh + t0 * dm.ks, dm.ks, nk, D, dm.vec != 0);
      load_tile(vs, D, vh + t0 * dm.vs, dm.vs, nk, D, dm.vec != 0);
    }
    __syncthreads();  // the tile is in
    for (int r = warp; r < nr; r += kWarps) {  // a warp per row, a lane per key
      const int i = (r0 + r) % n;
      const bool vis = lane < nk && t0 + lane <= seg - n + i;
      const float* qr = qs + r * D;
      const float* kr = ks + lane * kld;
      float dot;
      if (four) {
        float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
        for (int d = 0; d < D; d += 4) {
          const F4 a = *reinterpret_cast<const F4*>(qr + d), k4 = *reinterpret_cast<const F4*>(kr + d);
          d0 += a.x[0] * k4.x[0];
          d1 += a.x[1] * k4.x[1];
          d2 += a.x[2] * k4.x[2];
          d3 += a.x[3] * k4.x[3];
        }
        dot = (d0 + d1) + (d2 + d3);
      } else {
        dot = 0.f;
        for (int d = 0; d < D; ++d) dot += qr[d] * kr[d];
      }
      const float x = vis ? (kCap ? softcap_logit(dot, dm.softcap) : dot) : -INFINITY;
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
    for (int e = threadIdx.x; e < nr * D; e += blockDim.x) {
      const int r = e / D, d = e - r * D;
      const float* pr = s + r * kTK;
      float a = acc[e] * alpha_s[r];
      for (int j = 0; j < nk; ++j) a += pr[j] * vs[j * D + d];
      acc[e] = a;
    }
    __syncthreads();  // the next tile overwrites keys, values and probabilities
  }

  const int64_t row0 = bh * dm.R + r0;  // the block's first row of KV head bh
  if (dm.splits == 1) {
    for (int e = threadIdx.x; e < nr * D; e += blockDim.x)
      out[row0 * D + e] = static_cast<scalar_t>(acc[e] / l_s[e / D]);
  } else {
    const int64_t prow0 = (bh * dm.splits + split) * dm.R + r0;
    for (int e = threadIdx.x; e < nr * D; e += blockDim.x) part_acc[prow0 * D + e] = acc[e];
    for (int r = threadIdx.x; r < nr; r += blockDim.x) part_stat[prow0 + r] = SoftmaxStat{m_s[r], l_s[r]};
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
