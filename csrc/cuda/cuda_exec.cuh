// The executor the host launch code of csrc/cuda/*_kernels.cuh runs on in the extension: the
// current device (its limits queried once per process) and stream, the opt-in shared-memory
// attribute when a launch needs more than the default 48 KB, and a launch check after every
// launch. (The CPU simulator has its own executor with the same interface, SimExec in
// tests/cuda_sim/sim_ops.cpp.)
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <unordered_map>
#include <utility>

#include "kernel_support.cuh"

namespace snapkv {

class CudaExec {
 public:
  explicit CudaExec(const at::Tensor& on) : guard_(on.device()), stream_(c10::cuda::getCurrentCUDAStream()) {
    const Limits& lim = limits(on.get_device());
    sm_count_ = lim.sm_count;
    max_smem_ = lim.max_smem;
  }
  int sm_count() const { return sm_count_; }
  size_t max_smem_optin() const { return static_cast<size_t>(max_smem_); }

  template <typename... P, typename... A>
  void launch(const char* /*name*/, void (*kernel)(P...), const LaunchShape& ls, A&&... args) {
    if (needs_smem_optin(ls.smem))
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(ls.smem)));
    kernel<<<ls.grid, ls.block, ls.smem, stream_.stream()>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  struct Limits {
    int sm_count = 0;
    int max_smem = 0;
  };
  // The device's SM count and opt-in shared memory, queried from the driver once per device and
  // process (not per op).
  static const Limits& limits(int dev) {
    static std::mutex mu;
    static std::unordered_map<int, Limits> known;
    std::lock_guard<std::mutex> lock(mu);
    auto it = known.find(dev);
    if (it != known.end()) return it->second;
    Limits lim;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.sm_count, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&lim.max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    return known.emplace(dev, lim).first->second;
  }

  c10::cuda::CUDAGuard guard_;
  c10::cuda::CUDAStream stream_;
  int sm_count_ = 0;
  int max_smem_ = 0;
};

}  // namespace snapkv
