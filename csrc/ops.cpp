// Device-independent op bodies (compact_into, the fused compress path) and the CPU registration.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "dispatch.h"
#include "ops_impl.h"
#include "snapkv.h"

namespace snapkv {
namespace {

// Ask for huge pages under the outputs' buffers (CPU, several MB: a hint), before they are
// written: the page faults of writing tens of MB into fresh memory otherwise cost more than the
// gather itself. The buffers are the caller's (the allocating ops' fresh outputs, or a cache).
void advise_outputs(const at::Tensor& keys_out, const at::Tensor& values_out) {
  advise_huge_pages(keys_out);
  advise_huge_pages(values_out);
}

// Checks of the fused path's arguments (not the outputs); returns the window shape.
WindowShape check_compress_args(const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
                                int64_t max_capacity_prompt, int64_t kernel_size, const std::string& pooling,
                                const std::string& group_reduce, const c10::optional<at::Tensor>& pad_lengths,
                                c10::optional<double> scale, c10::optional<double> softcap) {
  const WindowShape s = check_window_args(q_window, keys, pad_lengths);
  SNAPKV_CHECK(values.sizes() == keys.sizes(), "values must have the shape of keys ", keys.sizes(),
               ", got ", values.sizes());
  SNAPKV_CHECK(values.scalar_type() == keys.scalar_type() && values.device() == keys.device(),
               "values must have the dtype and device of keys (", keys.scalar_type(), ", ",
               keys.device(), "), got ", values.scalar_type(), ", ", values.device());
  SNAPKV_CHECK(max_capacity_prompt > s.w, "max_capacity_prompt must be larger than the window w = ",
               s.w, ", got ", max_capacity_prompt);
  SNAPKV_CHECK(kernel_size > 0 && kernel_size % 2 == 1, "kernel_size must be a positive odd integer, got ",
               kernel_size);
  parse_pooling(pooling);
  parse_group_reduce(group_reduce);
  resolve_scale(scale, s.D);
  resolve_softcap(softcap);
  return s;
}

// Score, pool, select and compact into the (checked) outputs; -> kept positions.
at::Tensor compress_checked(const Backend& be, const WindowShape& s, const at::Tensor& q_window,
                            const at::Tensor& keys, const at::Tensor& values, int64_t max_capacity_prompt,
                            const at::Tensor& keys_out, const at::Tensor& values_out, int64_t kernel_size,
                            const std::string& pooling, const std::string& group_reduce,
                            const c10::optional<at::Tensor>& pad_lengths, c10::optional<double> scale,
                            c10::optional<double> softcap) {
  auto pos_opts = keys.options().dtype(at::kLong);
  if (s.L <= max_capacity_prompt) {
    // Nothing is dropped: the cache is the prompt's, exactly.
    keys_out.copy_(keys);
    values_out.copy_(values);
    return at::arange(s.L, pos_opts).expand({s.B, s.Hkv, s.L}).contiguous();
  }
  const int64_t k = max_capacity_prompt - s.w;
  auto scores = be.window_scores(q_window, keys, pad_lengths, group_reduce, scale, softcap);
  auto pooled = be.pool_scores(scores, kernel_size, pooling, pad_lengths);
  auto indices = be.select_topk(pooled, k);
  // indices come from select_topk, so they are in range by construction: no host sync here.
  be.compact_into(keys, values, indices, s.w, keys_out, values_out);
  auto window_pos = at::arange(s.L - s.w, s.L, pos_opts).expand({s.B, s.Hkv, s.w});
  return at::cat({indices, window_pos}, 2);
}

}  // namespace

void compact_into_with(const Backend& be, const at::Tensor& keys, const at::Tensor& values,
                       const at::Tensor& indices, int64_t window_size, const at::Tensor& keys_out,
                       const at::Tensor& values_out) {
  check_compact_args(keys, values, indices, window_size, /*check_values=*/true);
  check_kv_out(keys, values, indices.size(2) + window_size, "k + w", keys_out, values_out);
  advise_outputs(keys_out, values_out);
  be.compact_into(keys, values, indices, window_size, keys_out, values_out);
}

at::Tensor compress_into_with(const Backend& be, const at::Tensor& q_window, const at::Tensor& keys,
                              const at::Tensor& values, int64_t max_capacity_prompt,
                              const at::Tensor& keys_out, const at::Tensor& values_out, int64_t kernel_size,
                              const std::string& pooling, const std::string& group_reduce,
                              const c10::optional<at::Tensor>& pad_lengths, c10::optional<double> scale,
                              c10::optional<double> softcap) {
  const WindowShape s = check_compress_args(q_window, keys, values, max_capacity_prompt, kernel_size, pooling,
                                            group_reduce, pad_lengths, scale, softcap);
  check_kv_out(keys, values, std::min(s.L, max_capacity_prompt), "min(L, max_capacity_prompt)", keys_out,
               values_out);
  advise_outputs(keys_out, values_out);
  return compress_checked(be, s, q_window, keys, values, max_capacity_prompt, keys_out, values_out, kernel_size,
                          pooling, group_reduce, pad_lengths, scale, softcap);
}

const Backend kCpuBackend{&window_scores_cpu, &pool_scores_cpu, &select_topk_cpu,
                          &compact_into_cpu_unchecked, &ragged_attention_cpu};

TORCH_LIBRARY_IMPL(snapkv, CPU, m) { register_device_ops<kCpuBackend>(m); }

}  // namespace snapkv
