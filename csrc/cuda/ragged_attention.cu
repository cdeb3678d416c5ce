// CUDA ragged attention: the kernels and their launch plan are in ragged_attention_kernels.cuh
// (shared with the CPU simulator of the tests); this file runs them on the current stream.
#include "../snapkv.h"
#include "cuda_exec.cuh"
#include "ragged_attention_kernels.cuh"

namespace snapkv {

at::Tensor ragged_attention_cuda(const RaggedShape& s, const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& starts, const at::Tensor& lengths,
                                 double scale, c10::optional<double> softcap) {
  CudaExec ex(q);
  return ra::ragged_attention_run(ex, s, q, keys, values, starts, lengths, static_cast<float>(scale),
                                  resolve_softcap(softcap));
}

}  // namespace snapkv
