// CUDA pooling, top-k and compaction: the kernels and their launch shapes are in
// select_compact_kernels.cuh (shared with the CPU simulator of the tests).
#include "../snapkv.h"
#include "cuda_exec.cuh"
#include "select_compact_kernels.cuh"

namespace snapkv {

at::Tensor pool_scores_cuda(const at::Tensor& scores, int64_t kernel_size, const std::string& pooling,
                            const c10::optional<at::Tensor>& pad_lengths) {
  CudaExec ex(scores);
  return sel::pool_scores_run(ex, scores, kernel_size, parse_pooling(pooling), pad_lengths);
}

at::Tensor select_topk_cuda(const at::Tensor& scores, int64_t k) {
  CudaExec ex(scores);
  return sel::select_topk_run(ex, scores, k);
}

void compact_into_cuda_unchecked(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& indices,
                                 int64_t window_size, const at::Tensor& keys_out, const at::Tensor& values_out) {
  CudaExec ex(keys);
  sel::compact_into_run(ex, keys, values, indices, window_size, keys_out, values_out);
}

}  // namespace snapkv
