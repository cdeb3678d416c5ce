// Pooling, top-k selection and the compacting gather. The per-element rules (pooling windows,
// top-k order keys, the radix bin choice) are the helpers of common.h the CPU kernels use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "../common.h"
#include "../dispatch.h"
#include "kernel_support.cuh"

namespace snapkv {
namespace sel {

// ---------------------------------------------------------------- pooling
constexpr int kPoolThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kPoolThreads)
    pool_kernel(const scalar_t* __restrict__ in,  // [B, H, N]
                scalar_t* __restrict__ out,       // [B, H, N]
                const int64_t* __restrict__ pad,  // [B] or null
                int64_t H, int64_t N, int64_t total, int64_t kernel_size, Pooling mode) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t row = e / N, j = e % N;
  if (pad && j < pad[row / H]) {
    out[e] = static_cast<scalar_t>(neg_inf());
    return;
  }
  int64_t lo, hi;
  pool_bounds(j, N, kernel_size, &lo, &hi);
  float acc = pool_init(mode);
  for (int64_t t = lo; t < hi; ++t) acc = pool_combine(mode, acc, static_cast<float>(in[row * N + t]));
  out[e] = static_cast<scalar_t>(pool_finish(mode, acc, kernel_size));
}

// ---------------------------------------------------------------- top-k
constexpr int kTopkThreads = 1024;
constexpr int kTopkWarps = kTopkThreads / 32;

struct TopkSmem {
  size_t hist, scratch, state, bytes;
  __host__ __device__ TopkSmem() {
    SmemCarver c;
    hist = c.take<uint32_t>(kTopkWarps * 256);  // a private histogram per warp: no hot atomics
    scratch = c.take<int>(32);
    state = c.take<int64_t>(2);                 // prefix, need
    bytes = c.offset;
  }
};

// Exclusive prefix sum of `v` over the block; `*total` gets the block's sum. Every thread of
// the block must call it; `scratch` holds 32 ints.
__device__ inline int block_exclusive_sum(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int x = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int t = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, t, off);
      if (lane >= off) t += y;
    }
    scratch[lane] = t;  // inclusive sums of the warp totals
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : scratch[warp - 1];
  *total = scratch[warps - 1];
  __syncthreads();  // scratch is reused by the next call
  return before + x - v;
}

// One block per row: radix-select the k-th best order key T, then write, in position order,
// every position whose key beats T and the first `need` positions whose key equals T.
template <typename scalar_t>
__global__ void __launch_bounds__(kTopkThreads)
    topk_kernel(const scalar_t* __restrict__ scores,  // [rows, N]
                int64_t* __restrict__ out,            // [rows, k]
                int64_t N, int64_t k) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TopkSmem lay;
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem + lay.hist);
  int* scratch = reinterpret_cast<int*>(smem + lay.scratch);
  int64_t* state = reinterpret_cast<int64_t*>(smem + lay.state);
  const int64_t row = blockIdx.x;
  const scalar_t* x = scores + row * N;
  const int warp = threadIdx.x / 32;

  uint32_t prefix = 0, mask = 0;
  int64_t need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int t = threadIdx.x; t < kTopkWarps * 256; t += blockDim.x) hist[t] = 0;
    __syncthreads();
    uint32_t* mine = hist + warp * 256;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const uint32_t key = order_key(static_cast<float>(x[j]));
      if ((key & mask) == prefix) atomicAdd(&mine[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    // Bin b's count over all warps, then the bins above b by a block scan over descending bins:
    // thread t < 256 looks at bin 255 - t.
    int count = 0;
    if (threadIdx.x < 256)
      for (int wv = 0; wv < kTopkWarps; ++wv) count += static_cast<int>(hist[wv * 256 + 255 - threadIdx.x]);
    int all;
    const int above = block_exclusive_sum(count, scratch, &all);
    if (threadIdx.x < 256) {
      const int bin = 255 - static_cast<int>(threadIdx.x);
      if (radix_bin_takes(bin, above, count, need)) {
        state[0] = prefix | (static_cast<uint32_t>(bin) << shift);
        state[1] = need - above;
      }
    }
    __syncthreads();
    prefix = static_cast<uint32_t>(state[0]);
    need = state[1];
    mask |= 0xFFu << shift;
    __syncthreads();  // hist and state are rewritten by the next pass
  }

  int64_t written = 0, equal_seen = 0;
  for (int64_t j0 = 0; j0 < N && written < k; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const uint32_t key = j < N ? order_key(static_cast<float>(x[j])) : 0u;
    const bool above = j < N && key > prefix;
    const bool equal = j < N && key == prefix;
    int n_equal, n_sel;
    const int eq_rank = block_exclusive_sum(equal ? 1 : 0, scratch, &n_equal);
    const bool sel = above || (equal && equal_seen + eq_rank < need);
    const int off = block_exclusive_sum(sel ? 1 : 0, scratch, &n_sel);
    if (sel && written + off < k) out[row * k + written + off] = j;
    written += n_sel;
    equal_seen += n_equal;
  }
}

// ---------------------------------------------------------------- compact
constexpr int kCompactThreads = 256;

struct alignas(16) Vec16 {
  uint32_t v[4];
};

// One warp per output row: out[b, h, r] = in[b, h, src(r)], src(r) = indices[b, h, r] for
// r < k, else L - w + (r - k). Strided in every dim but the last. V is the copy unit: Vec16
// (16 bytes) when every row start is 16-byte aligned, else the element type.
template <typename V>
__global__ void __launch_bounds__(kCompactThreads)
    compact_kernel(const V* __restrict__ keys, const V* __restrict__ values,
                   const int64_t* __restrict__ indices,  // [B, H, k] contiguous
                   V* __restrict__ keys_out, V* __restrict__ values_out,
                   int64_t H, int64_t L, int64_t Dv, int64_t k, int64_t w, int64_t total_rows,
                   int64_t ks0, int64_t ks1, int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2,
                   int64_t ko0, int64_t ko1, int64_t ko2, int64_t vo0, int64_t vo1, int64_t vo2) {
  const int64_t gr = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (gr >= total_rows) return;
  const int64_t rows = k + w;
  const int64_t bh = gr / rows, r = gr % rows, b = bh / H, h = bh % H;
  int64_t src = L - w + (r - k);
  if (r < k) {
    // The public op checked the indices on the host; clamping keeps any other caller in bounds.
    src = indices[bh * k + r];
    src = src < 0 ? 0 : (src >= L - w ? L - w - 1 : src);
  }
  const V* ki = keys + b * ks0 + h * ks1 + src * ks2;
  const V* vi = values + b * vs0 + h * vs1 + src * vs2;
  V* ko = keys_out + b * ko0 + h * ko1 + r * ko2;
  V* vo = values_out + b * vo0 + h * vo1 + r * vo2;
  for (int64_t d = lane; d < Dv; d += 32) {
    ko[d] = ki[d];
    vo[d] = vi[d];
  }
}

// ---- host side, shared by the CUDA launcher and the CPU simulator ----

template <class Exec>
at::Tensor pool_scores_run(Exec& ex, const at::Tensor& scores_in, int64_t kernel_size, Pooling mode,
                           const c10::optional<at::Tensor>& pad_lengths) {
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor pad = pad_lengths.has_value() ? pad_lengths->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(scores);
  const int64_t total = scores.numel(), H = scores.size(1), N = scores.size(2);
  const LaunchShape ls{dim3(static_cast<unsigned>(ceil_div(total, kPoolThreads))), dim3(kPoolThreads), 0};
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "pool_scores_cuda", [&] {
    ex.launch("pool_scores", pool_kernel<scalar_t>, ls, static_cast<const scalar_t*>(scores.data_ptr<scalar_t>()),
              out.data_ptr<scalar_t>(), static_cast<const int64_t*>(pad.defined() ? pad.data_ptr<int64_t>() : nullptr),
              H, N, total, kernel_size, mode);
  });
  return out;
}

template <class Exec>
at::Tensor select_topk_run(Exec& ex, const at::Tensor& scores_in, int64_t k) {
  const at::Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1), N = scores.size(2);
  at::Tensor out = at::empty({scores.size(0), scores.size(1), k}, scores.options().dtype(at::kLong));
  if (k == 0) return out;
  SNAPKV_CHECK(N < (int64_t{1} << 31), "select_topk on CUDA supports rows of fewer than 2^31 positions, got ", N);
  SNAPKV_CHECK(rows <= 2147483647, "select_topk on CUDA supports at most 2^31 - 1 rows, got ", rows);
  const LaunchShape ls{dim3(static_cast<unsigned>(rows)), dim3(kTopkThreads), TopkSmem().bytes};
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "select_topk_cuda", [&] {
    ex.launch("select_topk", topk_kernel<scalar_t>, ls, static_cast<const scalar_t*>(scores.data_ptr<scalar_t>()),
              out.data_ptr<int64_t>(), N, k);
  });
  return out;
}

// Copies 16 bytes at a time when the row length and every row start allow it.
inline bool rows_16b_aligned(const at::Tensor& t) {
  const int64_t es = t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(3) * es) % 16 == 0 &&
         (t.stride(0) * es) % 16 == 0 && (t.stride(1) * es) % 16 == 0 && (t.stride(2) * es) % 16 == 0;
}

template <class Exec>
void compact_into_run(Exec& ex, const at::Tensor& keys_in, const at::Tensor& values_in, const at::Tensor& indices_in,
                      int64_t window_size, const at::Tensor& keys_out, const at::Tensor& values_out) {
  const at::Tensor keys = keys_in.stride(3) == 1 ? keys_in : keys_in.contiguous();
  const at::Tensor values = values_in.stride(3) == 1 ? values_in : values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t B = keys.size(0), H = keys.size(1), L = keys.size(2), D = keys.size(3);
  const int64_t k = indices.size(2), total_rows = B * H * (k + window_size);
  if (total_rows == 0) return;
  const LaunchShape ls{dim3(static_cast<unsigned>(ceil_div(total_rows, kCompactThreads / 32))),
                       dim3(kCompactThreads), 0};
  const bool vec = rows_16b_aligned(keys) && rows_16b_aligned(values) && rows_16b_aligned(keys_out) &&
                   rows_16b_aligned(values_out);
  auto go = [&](auto unit) {
    using V = decltype(unit);
    const int64_t per = static_cast<int64_t>(sizeof(V)) / keys.element_size();  // elements per unit
    auto in = [](const at::Tensor& t) { return static_cast<const V*>(t.data_ptr()); };
    auto outp = [](const at::Tensor& t) { return static_cast<V*>(t.data_ptr()); };
    ex.launch("compact", compact_kernel<V>, ls, in(keys), in(values),
              static_cast<const int64_t*>(indices.data_ptr<int64_t>()), outp(keys_out), outp(values_out), H, L,
              D / per, k, window_size, total_rows, keys.stride(0) / per, keys.stride(1) / per, keys.stride(2) / per,
              values.stride(0) / per, values.stride(1) / per, values.stride(2) / per, keys_out.stride(0) / per,
              keys_out.stride(1) / per, keys_out.stride(2) / per, values_out.stride(0) / per,
              values_out.stride(1) / per, values_out.stride(2) / per);
  };
  if (vec) {
    go(Vec16{});
  } else {
    SNAPKV_DISPATCH_FLOATING(keys.scalar_type(), "compact_cuda", [&] { go(scalar_t{}); });
  }
}

}  // namespace sel
}  // namespace snapkv
