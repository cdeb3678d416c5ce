// What every kernel header of csrc/cuda/ needs, for both of the ways its kernel bodies are built:
//   - by nvcc, into the extension (the CUDA headers);
//   - by the host compiler with -DSNAPKV_CUDA_SIM, into the test-only CPU runtime of
//     tests/cuda_sim/ (cuda_sim.h supplies the same names), where the same bodies run on CPU
//     threads against the float64 reference under AddressSanitizer/UBSan.
// The host launch code of each op is a template over an executor (`Exec`): CudaExec (below)
// launches on the current stream with a check after every launch; the simulator's SimExec runs
// the same launch shapes on the CPU. So grid, block, shared-memory bytes and the opt-in
// attribute come from one piece of code that the CPU tests exercise.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef SNAPKV_CUDA_SIM
#include "cuda_sim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

namespace snapkv {

// A kernel's launch: grid, block and dynamic shared-memory bytes.
struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t smem;
};

// Above 48 KB of dynamic shared memory a kernel must opt in (cudaFuncSetAttribute) first.
constexpr size_t kDefaultSmemBytes = 48 * 1024;
inline bool needs_smem_optin(size_t bytes) { return bytes > kDefaultSmemBytes; }

// All shared memory of a kernel comes from the launch's dynamic byte count (never a static
// `__shared__`), so the byte count the host computes is the whole footprint and the simulator
// can fill it with garbage and bounds-check it.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef SNAPKV_CUDA_SIM
  return static_cast<T*>(cudasim::dynamic_smem());
#else
  extern __shared__ __align__(128) unsigned char snapkv_dynamic_smem[];
  return reinterpret_cast<T*>(snapkv_dynamic_smem);
#endif
}

// Carves consecutive arrays, each 128-byte aligned (WMMA needs 32, async copies 16), out of one
// byte range. Used on the host (to count the bytes of a launch) and in the kernel (to find the
// arrays), so the two cannot disagree.
struct SmemCarver {
  static constexpr size_t kAlign = 128;
  size_t offset = 0;
  template <typename T>
  __host__ __device__ size_t take(size_t count) {
    const size_t at = offset;
    offset += (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    return at;
  }
};

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace snapkv
