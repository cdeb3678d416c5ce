// CUDA window scoring: the kernels and their launch plan are in window_scores_kernels.cuh
// (shared with the CPU simulator of the tests); this file runs them on the current stream.
#include "../snapkv.h"
#include "cuda_exec.cuh"
#include "window_scores_kernels.cuh"

namespace snapkv {

at::Tensor window_scores_cuda(const at::Tensor& q_window, const at::Tensor& keys,
                              const c10::optional<at::Tensor>& pad_lengths,
                              const std::string& group_reduce, c10::optional<double> scale,
                              c10::optional<double> softcap) {
  CudaExec ex(keys);
  return ws::window_scores_run(ex, q_window, keys, pad_lengths, parse_group_reduce(group_reduce),
                               resolve_scale(scale, keys.size(3)), resolve_softcap(softcap));
}

}  // namespace snapkv
