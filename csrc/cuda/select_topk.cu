// CUDA top-k: the kernels and their launch plan are in select_topk_kernels.cuh (shared with the
// CPU simulator of the tests); this file runs them on the current stream.
#include "../snapkv.h"
#include "cuda_exec.cuh"
#include "select_topk_kernels.cuh"

namespace snapkv {

at::Tensor select_topk_cuda(const at::Tensor& scores, int64_t k) {
  CudaExec ex(scores);
  return sel::select_topk_run(ex, scores, k);
}

}  // namespace snapkv
