// CUDA top-k selection (the CPU kernel: select_topk.cpp) by radix select over order keys. The
// per-element rules (order keys, the radix bin choice) are the common.h helpers the CPU kernel
// uses. Namespace `sel`: the selection steps after scoring (pooling, top-k, compaction).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../common.h"
#include "../dispatch.h"
#include "kernel_support.cuh"

namespace snapkv {
namespace sel {

// Radix select of the k-th best order key T (four 8-bit digits, most significant first), then
// every position whose key beats T and the first `need` positions whose key equals T, written
// in position order. One CTA per row when there are rows enough to fill the GPU; otherwise
// each row is cut into slices, one CTA each: per digit the slices add private histograms into
// the row's, one CTA per row picks the bin; then the slices count, and write at the offsets the
// counts of the slices before them give.
constexpr int kTopkThreads = 1024;       // one CTA per row
constexpr int kSliceThreads = 256;       // one CTA per slice
constexpr int64_t kMinSlice = 4096;      // positions per slice, at least

// A row's selection state between launches: the key prefix chosen so far and how many keys
// equal to it are still to be taken.
struct TopkState {
  int64_t prefix;
  int64_t need;
};

struct TopkSmem {
  size_t hist, scratch, state, bytes;
  __host__ __device__ explicit TopkSmem(int threads) {
    SmemCarver c;
    hist = c.take<uint32_t>(threads / 32 * 256);  // a private histogram per warp: no hot atomics
    scratch = c.take<int>(32);
    state = c.take<int64_t>(2);
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

// The histogram of digit `shift` of the candidate keys (those matching `prefix` on the digits
// above) among x[lo, hi), in per-warp histograms hist[warps][256], summed: bin b's count is
// returned to thread 255 - b (threads >= 256 get 0). Every thread must call it.
template <typename scalar_t>
__device__ int block_digit_counts(const scalar_t* __restrict__ x, int64_t lo, int64_t hi, uint32_t prefix, int shift,
                                  uint32_t* hist) {
  const int warps = blockDim.x / 32;
  const uint32_t mask = shift == 24 ? 0u : ~0u << (shift + 8);
  for (int t = threadIdx.x; t < warps * 256; t += blockDim.x) hist[t] = 0;
  __syncthreads();
  uint32_t* mine = hist + threadIdx.x / 32 * 256;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const uint32_t key = order_key(static_cast<float>(x[j]));
    if ((key & mask) == prefix) atomicAdd(&mine[(key >> shift) & 0xFFu], 1u);
  }
  __syncthreads();
  int count = 0;
  if (threadIdx.x < 256)
    for (int wv = 0; wv < warps; ++wv) count += static_cast<int>(hist[wv * 256 + 255 - threadIdx.x]);
  __syncthreads();  // hist is rewritten by the next call
  return count;
}

// Picks the bin of this digit from the counts of block_digit_counts (thread t holds bin
// 255 - t): the thread of the chosen bin writes the new prefix and need to st. Every thread
// must call it; st is read by the caller after a barrier.
__device__ inline void block_pick_bin(int count, uint32_t prefix, int64_t need, int shift, int* scratch,
                                      TopkState* st) {
  int all;
  const int above = block_exclusive_sum(count, scratch, &all);
  if (threadIdx.x < 256) {
    const int bin = 255 - static_cast<int>(threadIdx.x);
    if (radix_bin_takes(bin, above, count, need)) {
      st->prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      st->need = need - above;
    }
  }
}

// Writes the selected positions of x[lo, hi) in position order to out[written ...], given how
// many were written and how many keys equal to T were seen before lo. Every thread must call it.
template <typename scalar_t>
__device__ void block_write_selected(const scalar_t* __restrict__ x, int64_t lo, int64_t hi, uint32_t prefix,
                                     int64_t need, int64_t written, int64_t equal_seen, int64_t k,
                                     int64_t* __restrict__ out, int* scratch) {
  for (int64_t j0 = lo; j0 < hi && written < k; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const uint32_t key = j < hi ? order_key(static_cast<float>(x[j])) : 0u;
    const bool above = j < hi && key > prefix;
    const bool equal = j < hi && key == prefix;
    int n_equal, n_sel;
    const int eq_rank = block_exclusive_sum(equal ? 1 : 0, scratch, &n_equal);
    const bool sel = above || (equal && equal_seen + eq_rank < need);
    const int off = block_exclusive_sum(sel ? 1 : 0, scratch, &n_sel);
    if (sel && written + off < k) out[written + off] = j;
    written += n_sel;
    equal_seen += n_equal;
  }
}

// One CTA per row.
template <typename scalar_t>
__global__ void __launch_bounds__(kTopkThreads)
    topk_kernel(const scalar_t* __restrict__ scores,  // [rows, N]
                int64_t* __restrict__ out,            // [rows, k]
                int64_t N, int64_t k) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TopkSmem lay(kTopkThreads);
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem + lay.hist);
  int* scratch = reinterpret_cast<int*>(smem + lay.scratch);
  TopkState* st = reinterpret_cast<TopkState*>(smem + lay.state);
  const int64_t row = blockIdx.x;
  const scalar_t* x = scores + row * N;
  uint32_t prefix = 0;
  int64_t need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const int count = block_digit_counts(x, 0, N, prefix, shift, hist);
    block_pick_bin(count, prefix, need, shift, scratch, st);
    __syncthreads();
    prefix = static_cast<uint32_t>(st->prefix);
    need = st->need;
    __syncthreads();  // st is rewritten by the next digit
  }
  block_write_selected(x, 0, N, prefix, need, 0, 0, k, out + row * k, scratch);
}

// Slice pass of one digit: adds slice blockIdx.x's histogram into the row's hist [rows, 256].
template <typename scalar_t>
__global__ void __launch_bounds__(kSliceThreads)
    topk_slice_hist_kernel(const scalar_t* __restrict__ scores,  // [rows, N]
                           const TopkState* __restrict__ state,  // [rows]
                           uint32_t* __restrict__ hist,          // [rows, 256]
                           int64_t N, int64_t slice, int shift) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TopkSmem lay(kSliceThreads);
  const int64_t row = blockIdx.y, lo = static_cast<int64_t>(blockIdx.x) * slice;
  const int64_t hi = lo + slice < N ? lo + slice : N;
  const int count = block_digit_counts(scores + row * N, lo, hi, static_cast<uint32_t>(state[row].prefix), shift,
                                       reinterpret_cast<uint32_t*>(smem + lay.hist));
  if (threadIdx.x < 256 && count > 0) atomicAdd(&hist[row * 256 + 255 - threadIdx.x], static_cast<uint32_t>(count));
}

// One CTA of 256 threads per row: picks the digit's bin from the row's histogram, updates the
// row's state and clears the histogram for the next digit.
__global__ void __launch_bounds__(kSliceThreads)
    topk_pick_kernel(TopkState* __restrict__ state,  // [rows]
                     uint32_t* __restrict__ hist,    // [rows, 256]
                     int shift) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TopkSmem lay(kSliceThreads);
  int* scratch = reinterpret_cast<int*>(smem + lay.scratch);
  const int64_t row = blockIdx.x;
  const uint32_t prefix = static_cast<uint32_t>(state[row].prefix);
  const int64_t need = state[row].need;
  const int count = static_cast<int>(hist[row * 256 + 255 - threadIdx.x]);
  hist[row * 256 + 255 - threadIdx.x] = 0;
  block_pick_bin(count, prefix, need, shift, scratch, &state[row]);  // every thread read state first
}

// Per slice: how many keys beat T and how many equal it: counts [rows, slices, 2].
template <typename scalar_t>
__global__ void __launch_bounds__(kSliceThreads)
    topk_slice_count_kernel(const scalar_t* __restrict__ scores, const TopkState* __restrict__ state,
                            int64_t* __restrict__ counts, int64_t N, int64_t slice) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TopkSmem lay(kSliceThreads);
  int* scratch = reinterpret_cast<int*>(smem + lay.scratch);
  const int64_t row = blockIdx.y, lo = static_cast<int64_t>(blockIdx.x) * slice;
  const int64_t hi = lo + slice < N ? lo + slice : N;
  const uint32_t prefix = static_cast<uint32_t>(state[row].prefix);
  const scalar_t* x = scores + row * N;
  int above = 0, equal = 0;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const uint32_t key = order_key(static_cast<float>(x[j]));
    above += key > prefix;
    equal += key == prefix;
  }
  int n_above, n_equal;
  block_exclusive_sum(above, scratch, &n_above);
  block_exclusive_sum(equal, scratch, &n_equal);
  if (threadIdx.x == 0) {
    counts[(row * gridDim.x + blockIdx.x) * 2] = n_above;
    counts[(row * gridDim.x + blockIdx.x) * 2 + 1] = n_equal;
  }
}

// Per slice: its selected positions, at the offset the slices before it leave.
template <typename scalar_t>
__global__ void __launch_bounds__(kSliceThreads)
    topk_slice_write_kernel(const scalar_t* __restrict__ scores, const TopkState* __restrict__ state,
                            const int64_t* __restrict__ counts, int64_t* __restrict__ out, int64_t N, int64_t slice,
                            int64_t k) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TopkSmem lay(kSliceThreads);
  int* scratch = reinterpret_cast<int*>(smem + lay.scratch);
  const int64_t row = blockIdx.y, lo = static_cast<int64_t>(blockIdx.x) * slice;
  const int64_t hi = lo + slice < N ? lo + slice : N;
  const int64_t need = state[row].need;
  int64_t above_before = 0, equal_before = 0;
  for (int64_t s = 0; s < blockIdx.x; ++s) {
    above_before += counts[(row * gridDim.x + s) * 2];
    equal_before += counts[(row * gridDim.x + s) * 2 + 1];
  }
  const int64_t written = above_before + (equal_before < need ? equal_before : need);
  block_write_selected(scores + row * N, lo, hi, static_cast<uint32_t>(state[row].prefix), need, written,
                       equal_before, k, out + row * k, scratch);
}

// Slices per row: 1 (one CTA per row) when the rows fill the GPU or are short.
inline int64_t topk_slices(int64_t rows, int64_t N, int sm_count) {
  const int64_t by_length = N / kMinSlice;
  const int64_t by_grid = ceil_div(2 * static_cast<int64_t>(sm_count), rows);
  const int64_t s = by_length < by_grid ? by_length : by_grid;
  return s > 1 ? s : 1;
}

// ---- host side, shared by the CUDA launcher and the CPU simulator ----

template <class Exec>
at::Tensor select_topk_run(Exec& ex, const at::Tensor& scores_in, int64_t k) {
  const at::Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1), N = scores.size(2);
  at::Tensor out = at::empty({scores.size(0), scores.size(1), k}, scores.options().dtype(at::kLong));
  if (k == 0) return out;
  SNAPKV_CHECK(N < (int64_t{1} << 31), "select_topk on CUDA supports rows of fewer than 2^31 positions, got ", N);
  SNAPKV_CHECK(rows <= 2147483647, "select_topk on CUDA supports at most 2^31 - 1 rows, got ", rows);
  const int64_t slices = topk_slices(rows, N, ex.sm_count());  // > 1 only for fewer rows than SMs
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "select_topk_cuda", [&] {
    const scalar_t* x = scores.data_ptr<scalar_t>();
    int64_t* o = out.data_ptr<int64_t>();
    if (slices == 1) {
      ex.launch("select_topk", topk_kernel<scalar_t>, LaunchShape{dim3(static_cast<unsigned>(rows)),
                dim3(kTopkThreads), TopkSmem(kTopkThreads).bytes}, x, o, N, k);
      return;
    }
    const int64_t slice = ceil_div(N, slices);
    const dim3 grid(static_cast<unsigned>(ceil_div(N, slice)), static_cast<unsigned>(rows));
    const size_t smem = TopkSmem(kSliceThreads).bytes;
    auto i64 = scores.options().dtype(at::kLong);
    at::Tensor state = at::zeros({rows, 2}, i64);
    state.select(1, 1).fill_(k);
    at::Tensor hist = at::zeros({rows, 256}, scores.options().dtype(at::kInt));
    at::Tensor counts = at::empty({rows, static_cast<int64_t>(grid.x), 2}, i64);
    auto* st = reinterpret_cast<TopkState*>(state.data_ptr<int64_t>());
    auto* h = reinterpret_cast<uint32_t*>(hist.data_ptr<int32_t>());
    for (int shift = 24; shift >= 0; shift -= 8) {
      ex.launch("select_topk.slice_hist", topk_slice_hist_kernel<scalar_t>, LaunchShape{grid, dim3(kSliceThreads), smem},
                x, static_cast<const TopkState*>(st), h, N, slice, shift);
      ex.launch("select_topk.pick", topk_pick_kernel,
                LaunchShape{dim3(static_cast<unsigned>(rows)), dim3(kSliceThreads), smem}, st, h, shift);
    }
    ex.launch("select_topk.slice_count", topk_slice_count_kernel<scalar_t>, LaunchShape{grid, dim3(kSliceThreads), smem},
              x, static_cast<const TopkState*>(st), counts.data_ptr<int64_t>(), N, slice);
    ex.launch("select_topk.slice_write", topk_slice_write_kernel<scalar_t>, LaunchShape{grid, dim3(kSliceThreads), smem},
              x, static_cast<const TopkState*>(st), static_cast<const int64_t*>(counts.data_ptr<int64_t>()), o, N,
              slice, k);
  });
  return out;
}

}  // namespace sel
}  // namespace snapkv
