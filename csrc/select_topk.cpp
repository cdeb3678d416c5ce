// CPU top-k per row: the k best positions by score (ties toward the lower position, NaN last),
// returned in position order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {

at::Tensor select_topk_cpu(const at::Tensor& scores_in, int64_t k) {
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), H = scores.size(1), N = scores.size(2);
  at::Tensor out = at::empty({B, H, k}, scores.options().dtype(at::kLong));
  if (k == 0) return out;
  SNAPKV_DISPATCH_FLOATING(scores.scalar_type(), "select_topk_cpu", [&] {
    const scalar_t* in = scores.data_ptr<scalar_t>();
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> key(N);
      std::vector<int64_t> pos(N);
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* x = in + row * N;
        for (int64_t j = 0; j < N; ++j) {
          key[j] = order_key(static_cast<float>(x[j]));
          pos[j] = j;
        }
        auto before = [&](int64_t a, int64_t b) { return ranks_before(key[a], a, key[b], b); };
        if (k < N) std::nth_element(pos.begin(), pos.begin() + (k - 1), pos.end(), before);
        std::sort(pos.begin(), pos.begin() + k);
        std::copy(pos.begin(), pos.begin() + k, o + row * k);
      }
    });
  });
  return out;
}

}  // namespace snapkv
