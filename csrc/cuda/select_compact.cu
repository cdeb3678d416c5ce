// CUDA pooling, top-k selection and compacting gather. The per-element rules (pooling windows,
// top-k order keys, the radix bin choice) are the helpers of common.h the CPU kernels use.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.h"
#include "../dispatch.h"
#include "../snapkv.h"

namespace snapkv {
namespace {

// ---------------------------------------------------------------- pooling
template <typename scalar_t>
__global__ void pool_kernel(const scalar_t* __restrict__ in,  // [B, H, N]
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

// Exclusive prefix sum of `v` over the block; `*total` gets the block's sum. Every thread of
// the block must call it; `scratch` holds 32 ints.
__device__ int block_exclusive_sum(int v, int* scratch, int* total) {
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
  __shared__ uint32_t hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ int64_t need_s;
  __shared__ int scratch[32];
  const int64_t row = blockIdx.x;
  const scalar_t* x = scores + row * N;

  uint32_t prefix = 0, mask = 0;
  int64_t need = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int t = threadIdx.x; t < 256; t += blockDim.x) hist[t] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const uint32_t key = order_key(static_cast<float>(x[j]));
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xFFu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int bin = radix_pick_bin(hist, &need);
      prefix_s = prefix | (static_cast<uint32_t>(bin) << shift);
      need_s = need;
    }
    __syncthreads();
    prefix = prefix_s;
    need = need_s;
    mask |= 0xFFu << shift;
    __syncthreads();  // hist, prefix_s and need_s are rewritten by the next pass
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
// One warp per output row: out[b, h, r] = in[b, h, src(r)], src(r) = indices[b, h, r] for
// r < k, else L - w + (r - k). Strided in every dim but the last.
template <typename scalar_t>
__global__ void compact_kernel(const scalar_t* __restrict__ keys, const scalar_t* __restrict__ values,
                               const int64_t* __restrict__ indices,  // [B, H, k] contiguous
                               scalar_t* __restrict__ keys_out, scalar_t* __restrict__ values_out,
                               int64_t H, int64_t L, int64_t D, int64_t k, int64_t w, int64_t total_rows,
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
  const scalar_t* ki = keys + b * ks0 + h * ks1 + src * ks2;
  const scalar_t* vi = values + b * vs0 + h * vs1 + src * vs2;
  scalar_t* ko = keys_out + b * ko0 + h * ko1 + r * ko2;
  scalar_t* vo = values_out + b * vo0 + h * vo1 + r * vo2;
  for (int64_t d = lane; d < D; d += 32) {
    ko[d] = ki[d];
    vo[d] = vi[d];
  }
}

}  // namespace

at::Tensor pool_scores_cuda(const at::Tensor& scores_in, int64_t kernel_size, const std::string& pooling,
                            const c10::optional<at::Tensor>& pad_lengths) {
  c10::cuda::CUDAGuard guard(scores_in.device());
  const Pooling mode = parse_pooling(pooling);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor pad = pad_lengths.has_value() ? pad_lengths->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(scores);
  const int64_t total = scores.numel(), H = scores.size(1), N = scores.size(2);
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "pool_scores_cuda", [&] {
    pool_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pad.defined() ? pad.data_ptr<int64_t>() : nullptr,
        H, N, total, kernel_size, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor select_topk_cuda(const at::Tensor& scores_in, int64_t k) {
  c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t rows = scores.size(0) * scores.size(1), N = scores.size(2);
  at::Tensor out = at::empty({scores.size(0), scores.size(1), k}, scores.options().dtype(at::kLong));
  if (k == 0) return out;
  SNAPKV_CHECK(N < (int64_t{1} << 31), "select_topk on CUDA supports rows of fewer than 2^31 positions, got ", N);
  SNAPKV_CHECK(rows <= 2147483647, "select_topk on CUDA supports at most 2^31 - 1 rows, got ", rows);
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "select_topk_cuda", [&] {
    topk_kernel<scalar_t><<<rows, kTopkThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), N, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void compact_into_cuda_unchecked(const at::Tensor& keys_in, const at::Tensor& values_in,
                                 const at::Tensor& indices_in, int64_t window_size,
                                 const at::Tensor& keys_out, const at::Tensor& values_out) {
  c10::cuda::CUDAGuard guard(keys_in.device());
  const at::Tensor keys = keys_in.stride(3) == 1 ? keys_in : keys_in.contiguous();
  const at::Tensor values = values_in.stride(3) == 1 ? values_in : values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t B = keys.size(0), H = keys.size(1), L = keys.size(2), D = keys.size(3);
  const int64_t k = indices.size(2), total_rows = B * H * (k + window_size);
  if (total_rows == 0) return;
  const int warps = 8;
  const int64_t blocks = (total_rows + warps - 1) / warps;
  SNAPKV_DISPATCH_FLOATING(keys.scalar_type(), "compact_cuda", [&] {
    compact_kernel<scalar_t><<<blocks, warps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
        keys.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
        keys_out.data_ptr<scalar_t>(), values_out.data_ptr<scalar_t>(), H, L, D, k, window_size, total_rows,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        keys_out.stride(0), keys_out.stride(1), keys_out.stride(2), values_out.stride(0), values_out.stride(1),
        values_out.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace snapkv
