// The CUDA kernels of csrc/cuda/, compiled by the host compiler against cuda_sim.h and exposed
// to Python for tests (tests/test_cuda_sim.py). The host launch code is the extension's own
// (the *_run templates), run on SimExec instead of CudaExec.
#include <torch/extension.h>

#include <map>
#include <string>
#include <tuple>

#include "cuda/compact_kernels.cuh"
#include "cuda/pool_scores_kernels.cuh"
#include "cuda/ragged_attention_kernels.cuh"
#include "cuda/select_topk_kernels.cuh"
#include "cuda/window_scores_kernels.cuh"
#include "snapkv.h"

namespace {

// The simulator's executor: launch shapes as the CUDA launcher computes them, run on the CPU.
// Like the driver, it refuses more than 48 KB of dynamic shared memory for a kernel that did
// not opt in, and more than the device's opt-in maximum.
class SimExec {
 public:
  int sm_count() const { return cudasim::config().sm_count; }
  size_t max_smem_optin() const { return static_cast<size_t>(cudasim::config().max_smem_optin); }

  template <typename... P, typename... A>
  void launch(const char* name, void (*kernel)(P...), const snapkv::LaunchShape& ls, A&&... args) {
    if (snapkv::needs_smem_optin(ls.smem)) optin_[reinterpret_cast<void*>(kernel)] = ls.smem;
    auto it = optin_.find(reinterpret_cast<void*>(kernel));
    const size_t allowed = it == optin_.end() ? snapkv::kDefaultSmemBytes : it->second;
    TORCH_CHECK(ls.smem <= allowed, "cuda_sim: kernel '", name, "' launched with ", ls.smem,
                " bytes of dynamic shared memory without opting in");
    std::tuple<std::decay_t<P>...> packed(static_cast<P>(args)...);
    cudasim::launch(name, ls.grid, ls.block, ls.smem, [&] { std::apply(kernel, packed); });
    ++launches_;
  }
  int launches() const { return launches_; }

 private:
  std::map<void*, size_t> optin_;
  int launches_ = 0;
};

void configure(const std::string& order, int workers, int sm_count, int64_t max_smem) {
  TORCH_CHECK(order == "forward" || order == "reverse", "order must be 'forward' or 'reverse'");
  auto& c = cudasim::config();
  c.order = order == "forward" ? cudasim::Order::Forward : cudasim::Order::Reverse;
  c.workers = workers;
  c.sm_count = sm_count;
  c.max_smem_optin = static_cast<int>(max_smem);
}

at::Tensor window_scores(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& pad,
                         const std::string& group_reduce, c10::optional<double> scale,
                         c10::optional<double> softcap) {
  snapkv::check_window_args(q, k, pad);
  SimExec ex;
  return snapkv::ws::window_scores_run(ex, q, k, pad, snapkv::parse_group_reduce(group_reduce),
                                       snapkv::resolve_scale(scale, k.size(3)), snapkv::resolve_softcap(softcap));
}

at::Tensor pool_scores(const at::Tensor& s, int64_t kernel_size, const std::string& pooling,
                       const c10::optional<at::Tensor>& pad) {
  snapkv::check_pool_args(s, kernel_size, pad);
  SimExec ex;
  return snapkv::sel::pool_scores_run(ex, s, kernel_size, snapkv::parse_pooling(pooling), pad);
}

at::Tensor select_topk(const at::Tensor& s, int64_t k) {
  snapkv::check_topk_args(s, k);
  SimExec ex;
  return snapkv::sel::select_topk_run(ex, s, k);
}

void compact_into(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& indices, int64_t w,
                  const at::Tensor& keys_out, const at::Tensor& values_out) {
  snapkv::check_compact_args(keys, values, indices, w, true);
  snapkv::check_kv_out(keys, values, indices.size(2) + w, "k + w", keys_out, values_out);
  SimExec ex;
  snapkv::sel::compact_into_run(ex, keys, values, indices, w, keys_out, values_out);
}

at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& starts, const at::Tensor& lengths, double scale,
                            c10::optional<double> softcap) {
  const snapkv::RaggedShape s =
      snapkv::check_ragged_attention_args(q, keys, values, starts, lengths, scale, softcap, true);
  SimExec ex;
  return snapkv::ra::ragged_attention_run(ex, s, q, keys, values, starts, lengths, static_cast<float>(scale),
                                          snapkv::resolve_softcap(softcap));
}

// The launch plan of ragged_attention, for tests of the host logic.
std::map<std::string, int64_t> ragged_attention_plan(int64_t B, int64_t Hkv, int64_t G, int64_t n, int64_t D,
                                                     int64_t max_len, int sm_count, int64_t max_smem) {
  snapkv::ra::Plan p;
  if (!snapkv::ra::plan_ragged_attention(B, Hkv, G, n, D, max_len, sm_count, static_cast<size_t>(max_smem), &p))
    return {{"ok", 0}};
  return {{"ok", 1}, {"rows", p.dm.rows}, {"splits", p.dm.splits}, {"tiles_per_split", p.dm.tiles_per_split},
          {"row_blocks", static_cast<int64_t>(p.attend.grid.z)}, {"smem", static_cast<int64_t>(p.attend.smem)}};
}

// The launch plan of window_scores, for tests of the host logic.
std::map<std::string, int64_t> window_scores_plan(int64_t B, int64_t Hkv, int64_t L, int64_t w, int64_t D,
                                                  int64_t G, int64_t elem_bytes, int sm_count, int64_t max_smem) {
  snapkv::ws::Plan p;
  const bool ok = snapkv::ws::plan_window_scores(B, Hkv, L, w, D, G, elem_bytes, true, 1.f, 0.f, sm_count,
                                                 static_cast<size_t>(max_smem), &p);
  if (!ok) return {{"ok", 0}};
  return {{"ok", 1},
          {"rows", p.stats_dm.rows},
          {"stats_chunk", p.stats_dm.chunk},
          {"stats_ctas", static_cast<int64_t>(p.stats.grid.x) * p.stats.grid.y},
          {"stats_smem", static_cast<int64_t>(p.stats.smem)},
          {"votes_chunk", p.votes_dm.chunk},
          {"votes_ctas", static_cast<int64_t>(p.votes.grid.x) * p.votes.grid.y},
          {"votes_smem", static_cast<int64_t>(p.votes.smem)},
          {"async_rows", p.stats_dm.async_rows},
          {"resident", p.stats_dm.resident}};
}

// Warp votes and shuffles over two warps with partial masks: [64, 6] int64 per thread:
// ballot (lower warp half), any, all (odd lanes), shfl_up by 3, shfl_down by 5 (width 16),
// shfl from lane 7.
at::Tensor warp_ops() {
  at::Tensor out = at::zeros({64, 6}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  cudasim::launch("warp_ops", dim3(1), dim3(64), 0, [&] {
    const int t = threadIdx.x, lane = t % 32;
    int64_t* r = o + t * 6;
    if (lane < 16) r[0] = __ballot_sync(0x0000ffffu, lane % 3 == 0);
    r[1] = __any_sync(0xffffffffu, t == 40);
    if (lane % 2 == 1) r[2] = __all_sync(0xaaaaaaaau, lane != 31 || t < 32);
    r[3] = __shfl_up_sync(0xffffffffu, t, 3);
    r[4] = __shfl_down_sync(0xffffffffu, t, 5, 16);
    r[5] = __shfl_sync(0xffffffffu, t, 7);
  });
  return out;
}

// A kernel that breaks the rules on purpose, so tests can check the simulator reports it.
void misbehave(const std::string& what) {
  auto body = [&] {
    if (what == "divergent_barrier") {
      if (threadIdx.x % 2 == 0) __syncthreads();
    } else if (what == "shfl_outside_mask") {
      __shfl_xor_sync(0x0000ffffu, 1.f, 16);
    } else if (what == "partial_warp_collective") {
      if (threadIdx.x < 16) __shfl_xor_sync(0xffffffffu, 1.f, 1);
    } else if (what == "smem_overflow") {
      float* s = snapkv::dynamic_smem<float>();
      volatile float sink = s[threadIdx.x + 16];  // 16 floats past the end for the last thread
      (void)sink;
    } else if (what == "wmma_mapping") {
      // Treats element e of lane l as row l / 2: the API promises no such mapping.
      nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c;
      nvcuda::wmma::fill_fragment(c, 0.f);
      for (int e = 0; e < c.num_elements; ++e) c.x[e] = static_cast<float>(threadIdx.x % 32 / 2);
      float* s = snapkv::dynamic_smem<float>();
      nvcuda::wmma::store_matrix_sync(s, c, 16, nvcuda::wmma::mem_row_major);
      __syncthreads();
      for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 16; ++col)
          if (s[r * 16 + col] != static_cast<float>(r)) cudasim::fail("wmma fragment is not row-mapped");
    } else if (what == "wmma_unaligned") {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
      nvcuda::wmma::load_matrix_sync(a, snapkv::dynamic_smem<__half>() + 8, 16);  // 16 bytes in
    } else {
      TORCH_CHECK(false, "unknown misbehaviour ", what);
    }
  };
  const size_t smem = what == "wmma_mapping" || what == "wmma_unaligned" ? 256 * sizeof(float) : 32 * sizeof(float);
  cudasim::launch(what.c_str(), dim3(1), dim3(32), smem, body);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("configure", &configure, py::arg("order") = "forward", py::arg("workers") = 2, py::arg("sm_count") = 132,
        py::arg("max_smem") = 227 * 1024);
  m.def("window_scores", &window_scores, py::arg("q_window"), py::arg("keys"), py::arg("pad_lengths") = py::none(),
        py::arg("group_reduce") = "mean", py::arg("scale") = py::none(), py::arg("softcap") = py::none());
  m.def("pool_scores", &pool_scores, py::arg("scores"), py::arg("kernel_size"), py::arg("pooling") = "max",
        py::arg("pad_lengths") = py::none());
  m.def("select_topk", &select_topk);
  m.def("compact_into", &compact_into);
  m.def("window_scores_plan", &window_scores_plan);
  m.def("ragged_attention", &ragged_attention, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("starts"),
        py::arg("lengths"), py::arg("scale"), py::arg("softcap") = py::none());
  m.def("ragged_attention_plan", &ragged_attention_plan);
  m.def("misbehave", &misbehave);
  m.def("warp_ops", &warp_ops);
  m.def("sanitized", [] {
#if defined(__SANITIZE_ADDRESS__)
    return true;
#else
    return false;
#endif
  });
}
