// CUDA compaction: the kernel and its launch shape are in compact_kernels.cuh (shared with the
// CPU simulator of the tests); this file runs it on the current stream.
#include "../snapkv.h"
#include "compact_kernels.cuh"
#include "cuda_exec.cuh"

namespace snapkv {

void compact_into_cuda_unchecked(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& indices,
                                 int64_t window_size, const at::Tensor& keys_out, const at::Tensor& values_out) {
  CudaExec ex(keys);
  sel::compact_into_run(ex, keys, values, indices, window_size, keys_out, values_out);
}

}  // namespace snapkv
