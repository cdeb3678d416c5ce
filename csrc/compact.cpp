// CPU compacting gather: out[b, h] = [rows[indices[b, h]], last window_size rows].
// Inputs and outputs may be strided in every dim but the last.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_parallel.h"
#include "cpu_math.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  // SNAPKV_CPU_NO_HUGE_PAGES=1 turns the advice off (bench_ops.py does, to count memory by RSS:
  // Linux folds a few 2 MB faults into the RSS counters too late for a precise reading).
  static const bool off = cpu::env_flag("SNAPKV_CPU_NO_HUGE_PAGES");
  if (off || !t.is_cpu() || !t.has_storage()) return;
  // The whole buffer under t (t may be a view into it, e.g. the front of a cache's buffer).
  const auto& storage = t.storage();
  if (storage.data() == nullptr || storage.nbytes() < 2 * kHuge) return;
  const auto p = reinterpret_cast<uintptr_t>(storage.data());
  const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), last = (p + storage.nbytes()) & ~(kHuge - 1);
  // Only whole 2 MB pages inside the buffer; the result is ignored, as the advice is a hint.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

void compact_into_cpu_unchecked(const at::Tensor& keys_in, const at::Tensor& values_in,
                                const at::Tensor& indices_in, int64_t window_size,
                                const at::Tensor& keys_out, const at::Tensor& values_out) {
  const at::Tensor keys = keys_in.stride(3) == 1 ? keys_in : keys_in.contiguous();
  const at::Tensor values = values_in.stride(3) == 1 ? values_in : values_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const int64_t B = keys.size(0), H = keys.size(1), L = keys.size(2), D = keys.size(3);
  const int64_t k = indices.size(2), rows = k + window_size;
  const size_t row_bytes = static_cast<size_t>(D) * keys.element_size();
  const int64_t* idx = indices.data_ptr<int64_t>();
  const char* src[2] = {static_cast<const char*>(keys.data_ptr()), static_cast<const char*>(values.data_ptr())};
  char* dst[2] = {static_cast<char*>(keys_out.data_ptr()), static_cast<char*>(values_out.data_ptr())};
  const at::Tensor* in_t[2] = {&keys, &values};
  const at::Tensor* out_t[2] = {&keys_out, &values_out};
  const int64_t es = keys.element_size();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      for (int t = 0; t < 2; ++t) {
        const at::Tensor& it = *in_t[t];
        const at::Tensor& ot = *out_t[t];
        const char* s = src[t] + (b * it.stride(0) + h * it.stride(1)) * es;
        char* d = dst[t] + (b * ot.stride(0) + h * ot.stride(1)) * es;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t from = r < k ? idx[bh * k + r] : L - window_size + (r - k);
          std::memcpy(d + r * ot.stride(2) * es, s + from * it.stride(2) * es, row_bytes);
        }
      }
    }
  });
}

}  // namespace snapkv
