// CUDA window scoring: the softmax votes of the window queries, per KV head, in three launches
// that never write the [B, H_q, w, L] attention matrix to global memory.
//
//   1. stats:   grid (key tiles, B*H_kv). Each CTA scores its TK keys against every window
//               query row of the group and writes one partial softmax statistic (max, sum)
//               per row and tile: [B*H_kv, R, tiles] with R = G*w.
//   2. combine: one warp per row merges its partials into the row's log-sum-exp.
//   3. votes:   grid (prefix tiles, B*H_kv). Each CTA rescores its keys, turns logits into
//               probabilities with the row's lse, averages over the window and reduces over
//               the GQA group: out [B, H_kv, L - w].
// The masking, softmax bookkeeping and group reduction are the helpers of common.h that the
// CPU kernel uses too.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.h"
#include "../dispatch.h"
#include "../snapkv.h"

namespace snapkv {
namespace {

constexpr int kThreads = 256;
constexpr int kTK = 64;                       // keys per tile (one per thread column)
constexpr int kTQ = 32;                       // query rows per tile
constexpr int kRowGroups = kThreads / kTK;    // 4 row groups of threads
constexpr int kRowsPerThread = kTQ / kRowGroups;  // 8 logits per thread

struct Dims {
  int64_t L, w, D, G, R, N, Hkv, tiles;
  float scale;
};

// Loads rows [j0, j0 + kTK) of one head's keys (zero past `j_end`) into ks[kTK][D + 1], fp32.
template <typename scalar_t>
__device__ void load_key_tile(float* __restrict__ ks, const scalar_t* __restrict__ kh,  // [L, D]
                              int64_t j0, int64_t j_end, int64_t D) {
  for (int64_t e = threadIdx.x; e < kTK * D; e += blockDim.x) {
    const int64_t row = e / D, col = e % D, j = j0 + row;
    ks[row * (D + 1) + col] = j < j_end ? static_cast<float>(kh[j * D + col]) : 0.f;
  }
}

// Loads `n` (<= kTQ) query rows starting at row r0 of qg [R, D], pre-scaled, zero-filling the
// rest of the tile.
template <typename scalar_t>
__device__ void load_query_tile(float* __restrict__ qs, const scalar_t* __restrict__ qg,  // [R, D]
                                int64_t r0, int64_t n, int64_t D, float scale) {
  for (int64_t e = threadIdx.x; e < kTQ * D; e += blockDim.x) {
    const int64_t row = e / D, col = e % D;
    qs[row * (D + 1) + col] = row < n ? static_cast<float>(qg[(r0 + row) * D + col]) * scale : 0.f;
  }
}

// acc[m] = q[row_group + m * kRowGroups] . k[col] over the tiles in shared memory.
__device__ void tile_logits(const float* __restrict__ qs, const float* __restrict__ ks, int64_t D,
                            int col, int row_group, float acc[kRowsPerThread]) {
#pragma unroll
  for (int m = 0; m < kRowsPerThread; ++m) acc[m] = 0.f;
  const float* kc = ks + col * (D + 1);
  for (int64_t d = 0; d < D; ++d) {
    const float kv = kc[d];
#pragma unroll
    for (int m = 0; m < kRowsPerThread; ++m)
      acc[m] = fmaf(qs[(row_group + m * kRowGroups) * (D + 1) + d], kv, acc[m]);
  }
}

__device__ SoftmaxStat warp_merge(SoftmaxStat s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    SoftmaxStat o{__shfl_xor_sync(0xffffffffu, s.m, off), __shfl_xor_sync(0xffffffffu, s.l, off)};
    s = stat_merge(s, o);
  }
  return s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* __restrict__ q,      // [B, H_kv, R, D] (query head kv*G + g, row g*w + i)
                 const scalar_t* __restrict__ keys,   // [B, H_kv, L, D]
                 const int64_t* __restrict__ pad,     // [B] or null
                 SoftmaxStat* __restrict__ partial,   // [B*H_kv, R, tiles]
                 Dims dm) {
  extern __shared__ float smem[];
  float* ks = smem;                          // [kTK][D + 1]
  float* qs = smem + kTK * (dm.D + 1);       // [kTQ][D + 1]
  __shared__ SoftmaxStat halves[2][kTQ];     // per half-row-of-threads partials

  const int64_t bh = blockIdx.y, tile = blockIdx.x, j0 = tile * kTK;
  const int64_t b = bh / dm.Hkv;
  const int64_t p0 = pad ? pad[b] : 0;
  const int col = threadIdx.x % kTK, row_group = threadIdx.x / kTK;
  const int lane = threadIdx.x % 32, half = col / 32;
  const int64_t j = j0 + col;

  load_key_tile(ks, keys + bh * dm.L * dm.D, j0, dm.L, dm.D);
  for (int64_t r0 = 0; r0 < dm.R; r0 += kTQ) {
    const int64_t n = dm.R - r0 < kTQ ? dm.R - r0 : kTQ;
    load_query_tile(qs, q + bh * dm.R * dm.D, r0, n, dm.D, dm.scale);
    __syncthreads();
    float acc[kRowsPerThread];
    tile_logits(qs, ks, dm.D, col, row_group, acc);
#pragma unroll
    for (int m = 0; m < kRowsPerThread; ++m) {
      const int64_t rt = row_group + m * kRowGroups, r = r0 + rt;
      const bool vis = r < dm.R && j < dm.L && key_visible(j, r % dm.w, dm.L, dm.w, p0);
      SoftmaxStat s = vis ? SoftmaxStat{acc[m], 1.f} : stat_empty();
      s = warp_merge(s);
      if (lane == 0) halves[half][rt] = s;
    }
    __syncthreads();
    if (threadIdx.x < n) {
      const int64_t r = r0 + threadIdx.x;
      partial[(bh * dm.R + r) * dm.tiles + tile] = stat_merge(halves[0][threadIdx.x], halves[1][threadIdx.x]);
    }
    __syncthreads();  // qs and halves are rewritten by the next row tile
  }
}

// One warp per row: merge the row's partials into its log-sum-exp.
__global__ void combine_kernel(const SoftmaxStat* __restrict__ partial,  // [rows, tiles]
                               float* __restrict__ lse,                  // [rows]
                               int64_t rows, int64_t tiles) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps exit together: rows are warp-aligned
  SoftmaxStat s = stat_empty();
  for (int64_t t = lane; t < tiles; t += 32) s = stat_merge(s, partial[row * tiles + t]);
  s = warp_merge(s);
  if (lane == 0) lse[row] = stat_lse(s);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    votes_kernel(const scalar_t* __restrict__ q,     // [B, H_kv, R, D]
                 const scalar_t* __restrict__ keys,  // [B, H_kv, L, D]
                 const int64_t* __restrict__ pad,    // [B] or null
                 const float* __restrict__ lse,      // [B*H_kv, R]
                 float* __restrict__ out,            // [B, H_kv, N]
                 Dims dm, GroupReduce reduce) {
  extern __shared__ float smem[];
  float* ks = smem;
  float* qs = smem + kTK * (dm.D + 1);
  __shared__ float red[kRowGroups][kTK];

  const int64_t bh = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kTK;
  const int64_t b = bh / dm.Hkv;
  const int64_t p0 = pad ? pad[b] : 0;
  const int col = threadIdx.x % kTK, row_group = threadIdx.x / kTK;
  const int64_t j = j0 + col;
  // Prefix keys are visible to every window query, unless they are padding.
  const bool vis = j < dm.N && j >= p0;
  const float* lse_h = lse + bh * dm.R;

  load_key_tile(ks, keys + bh * dm.L * dm.D, j0, dm.N, dm.D);
  float total = group_init(reduce);
  for (int64_t g = 0; g < dm.G; ++g) {
    float vote = 0.f;
    for (int64_t i0 = 0; i0 < dm.w; i0 += kTQ) {
      const int64_t n = dm.w - i0 < kTQ ? dm.w - i0 : kTQ;
      load_query_tile(qs, q + bh * dm.R * dm.D, g * dm.w + i0, n, dm.D, dm.scale);
      __syncthreads();
      float acc[kRowsPerThread];
      tile_logits(qs, ks, dm.D, col, row_group, acc);
#pragma unroll
      for (int m = 0; m < kRowsPerThread; ++m) {
        const int64_t it = row_group + m * kRowGroups;
        if (it < n && vis) vote += prob_from_lse(acc[m], lse_h[g * dm.w + i0 + it]);
      }
      __syncthreads();  // qs is rewritten by the next row tile
    }
    red[row_group][col] = vote;
    __syncthreads();
    if (row_group == 0) {
      float v = 0.f;
#pragma unroll
      for (int t = 0; t < kRowGroups; ++t) v += red[t][col];
      total = group_combine(reduce, total, v / static_cast<float>(dm.w));
    }
    __syncthreads();  // red is rewritten by the next group head
  }
  if (row_group == 0 && j < dm.N) out[bh * dm.N + j] = vis ? group_finish(reduce, total, dm.G) : 0.f;
}

}  // namespace

at::Tensor window_scores_cuda(const at::Tensor& q_window, const at::Tensor& keys,
                              const c10::optional<at::Tensor>& pad_lengths,
                              const std::string& group_reduce, c10::optional<double> scale_opt) {
  c10::cuda::CUDAGuard guard(keys.device());
  const WindowShape s = window_shape(q_window, keys);
  const GroupReduce reduce = parse_group_reduce(group_reduce);
  Dims dm{s.L, s.w, s.D, s.group(), s.group() * s.w, s.L - s.w, s.Hkv, (s.L + kTK - 1) / kTK,
          resolve_scale(scale_opt, s.D)};
  const size_t smem = static_cast<size_t>(kTK + kTQ) * (s.D + 1) * sizeof(float);
  int dev = keys.get_device(), max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  SNAPKV_CHECK(smem + 2 * kTQ * sizeof(SoftmaxStat) <= static_cast<size_t>(max_smem),
               "head dim D = ", s.D, " is too large for the CUDA window_scores kernel on this GPU");
  SNAPKV_CHECK(s.B * s.Hkv <= 65535, "B * H_kv must be at most 65535 for the CUDA kernels, got ", s.B * s.Hkv);

  // Query head kv*G + g is row g*w + i of KV head kv: a view, no copy, when q is contiguous.
  const at::Tensor q = q_window.contiguous().view({s.B, s.Hkv, dm.R, s.D});
  const at::Tensor k = keys.contiguous();
  const at::Tensor pad = pad_lengths.has_value() ? pad_lengths->contiguous() : at::Tensor();
  const int64_t* pad_ptr = pad.defined() ? pad.data_ptr<int64_t>() : nullptr;
  const int64_t rows = s.B * s.Hkv * dm.R;
  auto f32 = keys.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({rows * dm.tiles * 2}, f32);  // SoftmaxStat pairs
  at::Tensor lse = at::empty({rows}, f32);
  at::Tensor out = at::zeros({s.B, s.Hkv, dm.N}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();

  SNAPKV_DISPATCH_FLOATING(k.scalar_type(), "window_scores_cuda", [&] {
    auto* qp = q.data_ptr<scalar_t>();
    auto* kp = k.data_ptr<scalar_t>();
    auto* pp = reinterpret_cast<SoftmaxStat*>(partial.data_ptr<float>());
    C10_CUDA_CHECK(cudaFuncSetAttribute(stats_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    C10_CUDA_CHECK(cudaFuncSetAttribute(votes_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    stats_kernel<scalar_t><<<dim3(dm.tiles, s.B * s.Hkv), kThreads, smem, stream>>>(qp, kp, pad_ptr, pp, dm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t warps_per_block = 8;
    const int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
    combine_kernel<<<blocks, warps_per_block * 32, 0, stream>>>(pp, lse.data_ptr<float>(), rows, dm.tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t vote_tiles = (dm.N + kTK - 1) / kTK;
    votes_kernel<scalar_t><<<dim3(vote_tiles, s.B * s.Hkv), kThreads, smem, stream>>>(
        qp, kp, pad_ptr, lse.data_ptr<float>(), out.data_ptr<float>(), dm, reduce);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace snapkv
