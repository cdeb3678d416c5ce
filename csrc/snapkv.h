// Host-side declarations of every snapkv op and of the per-device kernels behind them.
//
// Shapes use: B batch, H_q query heads, H_kv key/value heads (H_q % H_kv == 0), L prompt
// length, D head dim, w observation window, k kept prefix positions.
//
// Adding an op `foo` (window_scores is the model for each step):
//  1. Schema: one `m.def` line with a one-line comment in bindings.cpp. An op that produces KV
//     writes into caller-owned buffers (`Tensor(a!)`, like compact_into); its allocating
//     variant is a torch.library.custom_op over it in snapkv_ext/ops.py (like compact).
//  2. Checks: `check_foo_args` in checks.cpp, declared below: SNAPKV_CHECKs naming the argument
//     and the value, shared by every device.
//  3. Kernels: `foo_cpu` in foo.cpp (cpu_parallel.h, cpu_math.h, per-element SNAPKV_HD helpers
//     in common.h) and `foo_cuda` in cuda/foo.cu, a `foo_run(Exec&, ...)` template in
//     cuda/foo_kernels.cuh launched with `ex.launch` (the sources are globbed); both declared
//     below, a `foo` member in struct Backend, set in kCpuBackend (ops.cpp) and kCudaBackend
//     (cuda/register_cuda.cpp).
//  4. Entry point: `foo_op<BE>` in ops_impl.h (NvtxRange, the checks, `BE.foo`) and its
//     `m.impl` in register_device_ops.
//  5. Python: in snapkv_ext/ops.py a typed, documented wrapper and a `register_fake` with the
//     same checks and messages; exported in __init__.py; `foo` in reference.py (float64).
//  6. Tests and numbers: tests/test_foo.py against the reference on every device; rows in
//     test_bad_inputs.py and test_opcheck_compile.py; the CUDA kernel bound in
//     tests/cuda_sim/sim_ops.cpp and tested in tests/cuda_sim/test_sim_kernels.py; a case in
//     benchmarks/bench_ops.py (bytes and FLOPs in roofline.py); a row in docs/ops.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace snapkv {

// ---- argument checks (checks.cpp), shared by the CPU and CUDA entry points ----

struct WindowShape {
  int64_t B, Hq, Hkv, L, D, w;
  int64_t group() const { return Hq / Hkv; }
};

// Shape of already-checked window arguments.
inline WindowShape window_shape(const at::Tensor& q_window, const at::Tensor& keys) {
  return WindowShape{q_window.size(0), q_window.size(1), keys.size(1), keys.size(2), q_window.size(3),
                     q_window.size(2)};
}

GroupReduce parse_group_reduce(const std::string& s);
Pooling parse_pooling(const std::string& s);
// Validates q_window [B, H_q, w, D] and keys [B, H_kv, L, D] (and pad_lengths [B] int64 with
// values in [0, L - w]); returns the shape.
WindowShape check_window_args(const at::Tensor& q_window, const at::Tensor& keys,
                              const c10::optional<at::Tensor>& pad_lengths);
// Validates scores [B, H, N] float, an odd positive kernel_size and pad_lengths [B] in [0, N].
void check_pool_args(const at::Tensor& scores, int64_t kernel_size,
                     const c10::optional<at::Tensor>& pad_lengths);
// Validates scores [B, H, N] float and 0 <= k <= N.
void check_topk_args(const at::Tensor& scores, int64_t k);
// Validates keys/values [B, H_kv, L, D], indices [B, H_kv, k] int64 and 0 < window_size < L.
// With check_values, also that every index lies in [0, L - window_size) (a host sync on CUDA).
void check_compact_args(const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& indices, int64_t window_size, bool check_values);
// Validates caller-owned outputs [B, H_kv, rows, D]: last dim contiguous, dtype/device of keys,
// no memory shared with the inputs or each other. rows_name says what rows is, for the message.
void check_kv_out(const at::Tensor& keys, const at::Tensor& values, int64_t rows, const char* rows_name,
                  const at::Tensor& keys_out, const at::Tensor& values_out);
// Shape of ragged_attention's arguments: n new tokens per query head, N rows in the store;
// max_len is the longest segment when the lengths were read (check_values), else -1.
struct RaggedShape {
  int64_t B, Hq, Hkv, n, D, N, max_len;
  int64_t group() const { return Hq / Hkv; }
};
// Validates q [B, H_q, n, D] (last dim contiguous), keys/values [N, D] with contiguous rows,
// starts/lengths [B, H_kv] int64 (H_q % H_kv == 0), scale and softcap. With check_values, also
// that every segment holds n..N rows inside the store (lengths >= n, 0 <= starts,
// starts + lengths <= N): read directly on CPU, one host sync on CUDA (like compact's indices).
RaggedShape check_ragged_attention_args(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                        const at::Tensor& starts, const at::Tensor& lengths, double scale,
                                        const c10::optional<double>& softcap, bool check_values);
// The (already checked) left padding of each of B rows, zeros when pad_lengths is absent.
std::vector<int64_t> pad_values(const c10::optional<at::Tensor>& pad_lengths, int64_t B);
// 1 / sqrt(D) unless given; must be finite and positive.
float resolve_scale(const c10::optional<double>& scale, int64_t head_dim);
// The logit soft-cap as the kernels take it: 0 for None (no cap), else finite and positive.
float resolve_softcap(const c10::optional<double>& softcap);

// ---- kernels, one set per device; arguments already checked ----
// window_scores: -> [B, H_kv, L - w] float32, 0 at padded positions; softcap None: no cap.
// pool_scores:   -> same shape and dtype as scores, -inf at padded positions when pad given.
// select_topk:   -> [B, H, k] int64, sorted by position.
// compact_into:  writes [B, H_kv, k + w, D] into the outputs.
// ragged_attention: -> [B, H_q, n, D] in q's dtype, contiguous; `s` from the checks.

at::Tensor window_scores_cpu(const at::Tensor& q_window, const at::Tensor& keys,
                             const c10::optional<at::Tensor>& pad_lengths,
                             const std::string& group_reduce, c10::optional<double> scale,
                             c10::optional<double> softcap);
at::Tensor pool_scores_cpu(const at::Tensor& scores, int64_t kernel_size, const std::string& pooling,
                           const c10::optional<at::Tensor>& pad_lengths);
at::Tensor select_topk_cpu(const at::Tensor& scores, int64_t k);
void compact_into_cpu_unchecked(const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& indices, int64_t window_size,
                                const at::Tensor& keys_out, const at::Tensor& values_out);
at::Tensor ragged_attention_cpu(const RaggedShape& s, const at::Tensor& q, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& starts, const at::Tensor& lengths,
                                double scale, c10::optional<double> softcap);
// The buffer under a CPU tensor of several MB, before it is written: ask Linux to back it with
// 2 MB pages, so writing it takes one page fault per 2 MB instead of per 4 KB (a hint; no-op
// elsewhere and for pages already there).
void advise_huge_pages(const at::Tensor& t);

#ifdef SNAPKV_WITH_CUDA
at::Tensor window_scores_cuda(const at::Tensor& q_window, const at::Tensor& keys,
                              const c10::optional<at::Tensor>& pad_lengths,
                              const std::string& group_reduce, c10::optional<double> scale,
                              c10::optional<double> softcap);
at::Tensor pool_scores_cuda(const at::Tensor& scores, int64_t kernel_size, const std::string& pooling,
                            const c10::optional<at::Tensor>& pad_lengths);
at::Tensor select_topk_cuda(const at::Tensor& scores, int64_t k);
void compact_into_cuda_unchecked(const at::Tensor& keys, const at::Tensor& values,
                                 const at::Tensor& indices, int64_t window_size,
                                 const at::Tensor& keys_out, const at::Tensor& values_out);
at::Tensor ragged_attention_cuda(const RaggedShape& s, const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& starts, const at::Tensor& lengths,
                                 double scale, c10::optional<double> softcap);
#endif

// ---- the per-device kernels as one table, so the op entry points are written once ----
struct Backend {
  decltype(&window_scores_cpu) window_scores;
  decltype(&pool_scores_cpu) pool_scores;
  decltype(&select_topk_cpu) select_topk;
  decltype(&compact_into_cpu_unchecked) compact_into;
  decltype(&ragged_attention_cpu) ragged_attention;
};

// Public op bodies (ops.cpp), parameterised by the device's kernels.
void compact_into_with(const Backend& be, const at::Tensor& keys, const at::Tensor& values,
                       const at::Tensor& indices, int64_t window_size, const at::Tensor& keys_out,
                       const at::Tensor& values_out);
// The fused path: scores -> pool (padding masked) -> top-k -> compact, into caller-owned
// keys_out/values_out [B, H_kv, C', D] (e.g. the front of a preallocated cache), C' = min(L,
// max_capacity_prompt) (copies of the inputs when L <= max_capacity_prompt); returns the kept
// positions [B, H_kv, C'] int64.
at::Tensor compress_into_with(const Backend& be, const at::Tensor& q_window, const at::Tensor& keys,
                              const at::Tensor& values, int64_t max_capacity_prompt,
                              const at::Tensor& keys_out, const at::Tensor& values_out, int64_t kernel_size,
                              const std::string& pooling, const std::string& group_reduce,
                              const c10::optional<at::Tensor>& pad_lengths, c10::optional<double> scale,
                              c10::optional<double> softcap);

}  // namespace snapkv
