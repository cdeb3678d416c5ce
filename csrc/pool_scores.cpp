// CPU 1-D pooling of scores over positions (max or avg, odd kernel, stride 1, same length),
// then -inf at each row's left padding so a padded position can never be selected.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {

at::Tensor pool_scores_cpu(const at::Tensor& scores_in, int64_t kernel_size, const std::string& pooling,
                           const c10::optional<at::Tensor>& pad_lengths) {
  const Pooling mode = parse_pooling(pooling);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), H = scores.size(1), N = scores.size(2);
  at::Tensor out = at::empty_like(scores);
  std::vector<int64_t> pad(B, 0);
  if (pad_lengths.has_value()) {
    auto p = pad_lengths->cpu();
    for (int64_t b = 0; b < B; ++b) pad[b] = p[b].item<int64_t>();
  }
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "pool_scores_cpu", [&] {
    const scalar_t* in = scores.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* x = in + row * N;
        scalar_t* y = o + row * N;
        const int64_t p0 = pad[row / H];
        for (int64_t j = 0; j < N; ++j) {
          if (j < p0) {
            y[j] = static_cast<scalar_t>(neg_inf());
            continue;
          }
          int64_t lo, hi;
          pool_bounds(j, N, kernel_size, &lo, &hi);
          float acc = pool_init(mode);
          for (int64_t t = lo; t < hi; ++t) acc = pool_combine(mode, acc, static_cast<float>(x[t]));
          y[j] = static_cast<scalar_t>(pool_finish(mode, acc, kernel_size));
        }
      }
    });
  });
  return out;
}

}  // namespace snapkv
