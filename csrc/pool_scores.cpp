// CPU 1-D pooling of scores over positions (max or avg, odd kernel, stride 1, same length),
// then -inf at each row's left padding so a padded position can never be selected.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_math.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {

at::Tensor pool_scores_cpu(const at::Tensor& scores_in, int64_t kernel_size, const std::string& pooling,
                           const c10::optional<at::Tensor>& pad_lengths) {
  const Pooling mode = parse_pooling(pooling);
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), H = scores.size(1), N = scores.size(2);
  at::Tensor out = at::empty_like(scores);
  const std::vector<int64_t> pad = pad_values(pad_lengths, B);
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "pool_scores_cpu", [&] {
    const scalar_t* in = scores.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t half = kernel_size / 2;
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> x(N), acc(N);
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t j = 0; j < N; ++j) x[j] = static_cast<float>(in[row * N + j]);
        std::fill(acc.begin(), acc.end(), pool_init(mode));
        // One pass per kernel offset: acc[j] combines x[j + off] wherever that is in range,
        // which is exactly the clipped window of pool_bounds(j).
        for (int64_t off = -half; off <= half; ++off) {
          const int64_t lo = std::max<int64_t>(0, -off), hi = std::min<int64_t>(N, N - off);
          cpu::pool_accumulate(mode, x.data() + lo + off, hi - lo, acc.data() + lo);
        }
        scalar_t* y = o + row * N;
        const int64_t p0 = std::min(pad[row / H], N);
        for (int64_t j = 0; j < p0; ++j) y[j] = static_cast<scalar_t>(neg_inf());
        for (int64_t j = p0; j < N; ++j) y[j] = static_cast<scalar_t>(pool_finish(mode, acc[j], kernel_size));
      }
    });
  });
  return out;
}

}  // namespace snapkv
