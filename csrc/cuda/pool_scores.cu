// CUDA pooling: the kernel and its launch shape are in pool_scores_kernels.cuh (shared with the
// CPU simulator of the tests); this file runs it on the current stream.
#include "../snapkv.h"
#include "cuda_exec.cuh"
#include "pool_scores_kernels.cuh"

namespace snapkv {

at::Tensor pool_scores_cuda(const at::Tensor& scores, int64_t kernel_size, const std::string& pooling,
                            const c10::optional<at::Tensor>& pad_lengths) {
  CudaExec ex(scores);
  return sel::pool_scores_run(ex, scores, kernel_size, parse_pooling(pooling), pad_lengths);
}

}  // namespace snapkv
