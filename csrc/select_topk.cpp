// CPU top-k per row: the k best positions by score (ties toward the lower position, NaN last),
// returned in position order. Same radix select as the CUDA kernel (common.h), serial per row.
#include <ATen/ATen.h>

#include <vector>

#include "cpu_parallel.h"
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
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* x = in + row * N;
        for (int64_t j = 0; j < N; ++j) key[j] = order_key(static_cast<float>(x[j]));
        uint32_t prefix = 0, mask = 0;
        int64_t need = k;
        for (int shift = 24; shift >= 0; shift -= 8) {
          uint32_t hist[256] = {0};
          for (int64_t j = 0; j < N; ++j)
            if ((key[j] & mask) == prefix) ++hist[(key[j] >> shift) & 0xFFu];
          prefix |= static_cast<uint32_t>(radix_pick_bin(hist, &need)) << shift;
          mask |= 0xFFu << shift;
        }
        int64_t* y = o + row * k;
        int64_t n = 0;
        for (int64_t j = 0; j < N && n < k; ++j) {
          if (key[j] > prefix || (key[j] == prefix && need-- > 0)) y[n++] = j;
        }
      }
    });
  });
  return out;
}

}  // namespace snapkv
