// Registers the CUDA kernels for every snapkv op. Host-only C++: compiled by the host compiler,
// which keeps torch/library.h out of the slow nvcc translation units.
#include "../ops_impl.h"
#include "../snapkv.h"

namespace snapkv {

const Backend kCudaBackend{&window_scores_cuda, &pool_scores_cuda, &select_topk_cuda,
                           &compact_into_cuda_unchecked, &ragged_attention_cuda};

TORCH_LIBRARY_IMPL(snapkv, CUDA, m) { register_device_ops<kCudaBackend>(m); }

}  // namespace snapkv
