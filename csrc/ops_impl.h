// The public op bodies, written once and instantiated per device with that device's kernels:
// check arguments, open an NVTX range (CUDA), call the kernel.
#pragma once

#include <torch/library.h>

#include "snapkv.h"

#ifdef SNAPKV_WITH_CUDA
#include <nvtx3/nvToolsExt.h>
#endif

namespace snapkv {

// Names the op in an Nsight Systems timeline; costs nothing on CPU tensors.
class NvtxRange {
 public:
  NvtxRange(const char* name, const at::Tensor& t) {
#ifdef SNAPKV_WITH_CUDA
    active_ = t.is_cuda();
    if (active_) nvtxRangePushA(name);
#else
    (void)name;
    (void)t;
#endif
  }
  ~NvtxRange() {
#ifdef SNAPKV_WITH_CUDA
    if (active_) nvtxRangePop();
#endif
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  bool active_ = false;
};

template <const Backend& BE>
at::Tensor window_scores_op(const at::Tensor& q_window, const at::Tensor& keys,
                            const c10::optional<at::Tensor>& pad_lengths, c10::string_view group_reduce,
                            c10::optional<double> scale, c10::optional<double> softcap) {
  NvtxRange r("snapkv::window_scores", keys);
  const WindowShape s = check_window_args(q_window, keys, pad_lengths);
  const std::string gr(group_reduce);
  parse_group_reduce(gr);
  resolve_scale(scale, s.D);
  resolve_softcap(softcap);
  return BE.window_scores(q_window, keys, pad_lengths, gr, scale, softcap);
}

template <const Backend& BE>
at::Tensor pool_scores_op(const at::Tensor& scores, int64_t kernel_size, c10::string_view pooling,
                          const c10::optional<at::Tensor>& pad_lengths) {
  NvtxRange r("snapkv::pool_scores", scores);
  check_pool_args(scores, kernel_size, pad_lengths);
  const std::string p(pooling);
  parse_pooling(p);
  return BE.pool_scores(scores, kernel_size, p, pad_lengths);
}

template <const Backend& BE>
at::Tensor select_topk_op(const at::Tensor& scores, int64_t k) {
  NvtxRange r("snapkv::select_topk", scores);
  check_topk_args(scores, k);
  return BE.select_topk(scores, k);
}

template <const Backend& BE>
void compact_into_op(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& indices,
                     int64_t window_size, const at::Tensor& keys_out, const at::Tensor& values_out) {
  NvtxRange r("snapkv::compact_into", keys);
  compact_into_with(BE, keys, values, indices, window_size, keys_out, values_out);
}

template <const Backend& BE>
at::Tensor compress_into_op(const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
                            int64_t max_capacity_prompt, const at::Tensor& keys_out, const at::Tensor& values_out,
                            int64_t kernel_size, c10::string_view pooling, c10::string_view group_reduce,
                            const c10::optional<at::Tensor>& pad_lengths, c10::optional<double> scale,
                            c10::optional<double> softcap) {
  NvtxRange r("snapkv::snapkv_compress_into", keys);
  return compress_into_with(BE, q_window, keys, values, max_capacity_prompt, keys_out, values_out, kernel_size,
                            std::string(pooling), std::string(group_reduce), pad_lengths, scale, softcap);
}

template <const Backend& BE>
at::Tensor ragged_attention_op(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                               const at::Tensor& starts, const at::Tensor& lengths, double scale,
                               c10::optional<double> softcap) {
  NvtxRange r("snapkv::ragged_attention", q);
  const RaggedShape s =
      check_ragged_attention_args(q, keys, values, starts, lengths, scale, softcap, /*check_values=*/true);
  return BE.ragged_attention(s, q, keys, values, starts, lengths, scale, softcap);
}

// Registers every op of the `snapkv` library for one dispatch key with BE's kernels.
template <const Backend& BE>
void register_device_ops(torch::Library& m) {
  m.impl("window_scores", TORCH_FN(window_scores_op<BE>));
  m.impl("pool_scores", TORCH_FN(pool_scores_op<BE>));
  m.impl("select_topk", TORCH_FN(select_topk_op<BE>));
  m.impl("compact_into", TORCH_FN(compact_into_op<BE>));
  m.impl("snapkv_compress_into", TORCH_FN(compress_into_op<BE>));
  m.impl("ragged_attention", TORCH_FN(ragged_attention_op<BE>));
}

}  // namespace snapkv
