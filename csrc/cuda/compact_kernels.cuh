// CUDA compacting gather (the CPU kernel: compact.cpp): the kept rows, then the window's, into
// outputs that may be strided views. Namespace `sel`: the selection steps after scoring
// (pooling, top-k, compaction).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../dispatch.h"
#include "kernel_support.cuh"

namespace snapkv {
namespace sel {

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
