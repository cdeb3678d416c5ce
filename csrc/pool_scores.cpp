// CPU 1-D pooling of scores over positions (max or avg, odd kernel, stride 1, same length),
// then -inf at each row's left padding so a padded position can never be selected.
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_math.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {
namespace {

SNAPKV_CPU_VARIANTS(void, pool_interior, cpu::pool_interior,
                    (Pooling mode, const float* x, int64_t j0, int64_t j1, int64_t kernel_size, float* y),
                    (mode, x, j0, j1, kernel_size, y))

// One row: y[j] = pooled x over pool_bounds(j), -inf before p0 (left padding). x is float (the
// caller widens other dtypes into a scratch row).
template <typename T>
void pool_row(Pooling mode, const float* x, int64_t N, int64_t kernel_size, int64_t p0, T* y) {
  const int64_t half = kernel_size / 2;
  for (int64_t j = 0; j < p0; ++j) y[j] = static_cast<T>(neg_inf());
  // The first and last `half` positions have clipped windows; the interior, where every window
  // is whole, goes through the vectorised kernel.
  const int64_t i0 = std::max(p0, half), i1 = std::max(i0, N - half);
  auto edge = [&](int64_t j) {
    int64_t lo, hi;
    pool_bounds(j, N, kernel_size, &lo, &hi);
    float acc = pool_init(mode);
    for (int64_t t = lo; t < hi; ++t) acc = pool_combine(mode, acc, x[t]);
    y[j] = static_cast<T>(pool_finish(mode, acc, kernel_size));
  };
  for (int64_t j = p0; j < std::min(i0, N); ++j) edge(j);
  if constexpr (std::is_same_v<T, float>) {
    pool_interior(mode, x, i0, i1, kernel_size, y + i0);
  } else {
    float tile[256];
    for (int64_t j = i0; j < i1; j += 256) {
      const int64_t n = std::min<int64_t>(256, i1 - j);
      pool_interior(mode, x, j, j + n, kernel_size, tile);
      for (int64_t t = 0; t < n; ++t) y[j + t] = static_cast<T>(tile[t]);
    }
  }
  for (int64_t j = std::max(i1, p0); j < N; ++j) edge(j);
}

// A row as float: itself, or widened into scratch.
const float* float_row(const float* in, int64_t, float*) { return in; }
template <typename T>
const float* float_row(const T* in, int64_t n, float* scratch) {
  for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<float>(in[j]);
  return scratch;
}

}  // namespace

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
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> x(std::is_same_v<scalar_t, float> ? 0 : N);
      for (int64_t row = begin; row < end; ++row) {
        pool_row(mode, float_row(in + row * N, N, x.data()), N, kernel_size, std::min(pad[row / H], N),
                 o + row * N);
      }
    });
  });
  return out;
}

}  // namespace snapkv
