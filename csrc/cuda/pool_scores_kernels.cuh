// CUDA pooling of the scores over positions (the CPU kernel: pool_scores.cpp), one thread per
// output. The per-element rules (pooling windows, padded positions) are the common.h helpers the
// CPU kernel uses. Namespace `sel`: the selection steps after scoring (pooling, top-k, compaction).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include "../common.h"
#include "../dispatch.h"
#include "kernel_support.cuh"

namespace snapkv {
namespace sel {

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

}  // namespace sel
}  // namespace snapkv
