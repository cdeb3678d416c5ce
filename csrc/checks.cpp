// Argument validation shared by the CPU and CUDA entry points. Every message names the
// argument and what was expected, so a user can fix the call without reading this file.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const at::Tensor& t, const char* name) {
  SNAPKV_CHECK(is_float_dtype(t.scalar_type()), name,
               " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

}  // namespace

GroupReduce parse_group_reduce(const std::string& s) {
  if (s == "mean") return GroupReduce::Mean;
  if (s == "max") return GroupReduce::Max;
  if (s == "sum") return GroupReduce::Sum;
  SNAPKV_CHECK(false, "group_reduce must be 'mean', 'max' or 'sum', got '", s, "'");
  return GroupReduce::Mean;
}

Pooling parse_pooling(const std::string& s) {
  if (s == "max") return Pooling::Max;
  if (s == "avg") return Pooling::Avg;
  SNAPKV_CHECK(false, "pooling must be 'max' or 'avg', got '", s, "'");
  return Pooling::Max;
}

// pad_lengths [B] integer, on `device`, every value in [0, limit]. Reading the values costs a
// host sync on CUDA; an out-of-range pad would otherwise index outside the keys.
static void check_pad(const c10::optional<at::Tensor>& pad, int64_t B, int64_t limit,
                      const at::Tensor& like, const char* limit_desc) {
  if (!pad.has_value()) return;
  const at::Tensor& p = *pad;
  SNAPKV_CHECK(p.scalar_type() == at::kLong, "pad_lengths must be int64, got ", p.scalar_type());
  SNAPKV_CHECK(p.dim() == 1 && p.size(0) == B, "pad_lengths must be [B] = [", B, "], got ",
               shape_str(p));
  SNAPKV_CHECK(p.device() == like.device(), "pad_lengths must be on ", like.device(),
               " like the other inputs, got ", p.device());
  if (B == 0) return;
  auto mm = at::aminmax(p);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  SNAPKV_CHECK(lo >= 0 && hi <= limit, "pad_lengths values must be in [0, ", limit_desc, " = ",
               limit, "], got min ", lo, " max ", hi);
}

WindowShape check_window_args(const at::Tensor& q, const at::Tensor& keys,
                              const c10::optional<at::Tensor>& pad_lengths) {
  SNAPKV_CHECK(q.dim() == 4, "q_window must be [B, H_q, w, D], got ", shape_str(q));
  SNAPKV_CHECK(keys.dim() == 4, "keys must be [B, H_kv, L, D], got ", shape_str(keys));
  check_float(q, "q_window");
  check_float(keys, "keys");
  SNAPKV_CHECK(q.scalar_type() == keys.scalar_type(), "q_window and keys must have the same dtype, got ",
               q.scalar_type(), " and ", keys.scalar_type());
  SNAPKV_CHECK(q.device() == keys.device(), "q_window and keys must be on the same device, got ",
               q.device(), " and ", keys.device());
  const WindowShape s = window_shape(q, keys);
  SNAPKV_CHECK(keys.size(0) == s.B, "q_window and keys must have the same batch size, got ",
               shape_str(q), " and ", shape_str(keys));
  SNAPKV_CHECK(keys.size(3) == s.D, "q_window and keys must have the same head dim D, got ",
               shape_str(q), " and ", shape_str(keys));
  SNAPKV_CHECK(s.B > 0 && s.Hq > 0 && s.Hkv > 0 && s.D > 0,
               "q_window and keys must be non-empty, got ", shape_str(q), " and ", shape_str(keys));
  SNAPKV_CHECK(s.Hq % s.Hkv == 0, "H_q must be a multiple of H_kv (GQA), got H_q = ", s.Hq,
               " and H_kv = ", s.Hkv);
  SNAPKV_CHECK(s.w >= 1, "the window (q_window.size(2)) must be at least 1, got ", s.w);
  SNAPKV_CHECK(s.w < s.L, "the window w = q_window.size(2) must be smaller than L = keys.size(2), got w = ",
               s.w, " and L = ", s.L);
  check_pad(pad_lengths, s.B, s.L - s.w, keys, "L - w");
  return s;
}

void check_pool_args(const at::Tensor& scores, int64_t kernel_size,
                     const c10::optional<at::Tensor>& pad_lengths) {
  SNAPKV_CHECK(scores.dim() == 3, "scores must be [B, H, N], got ", shape_str(scores));
  check_float(scores, "scores");
  SNAPKV_CHECK(scores.numel() > 0, "scores must be non-empty, got ", shape_str(scores));
  SNAPKV_CHECK(kernel_size > 0 && kernel_size % 2 == 1, "kernel_size must be a positive odd integer, got ",
               kernel_size);
  check_pad(pad_lengths, scores.size(0), scores.size(2), scores, "N");
}

void check_topk_args(const at::Tensor& scores, int64_t k) {
  SNAPKV_CHECK(scores.dim() == 3, "scores must be [B, H, N], got ", shape_str(scores));
  check_float(scores, "scores");
  SNAPKV_CHECK(scores.numel() > 0, "scores must be non-empty, got ", shape_str(scores));
  SNAPKV_CHECK(k >= 0 && k <= scores.size(2), "k must be in [0, N = scores.size(2) = ", scores.size(2),
               "], got ", k);
}

void check_compact_args(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& indices,
                        int64_t window_size, bool check_values) {
  SNAPKV_CHECK(keys.dim() == 4, "keys must be [B, H_kv, L, D], got ", shape_str(keys));
  check_float(keys, "keys");
  SNAPKV_CHECK(values.sizes() == keys.sizes(), "values must have the shape of keys ", shape_str(keys),
               ", got ", shape_str(values));
  SNAPKV_CHECK(values.scalar_type() == keys.scalar_type(), "values must have the dtype of keys (",
               keys.scalar_type(), "), got ", values.scalar_type());
  SNAPKV_CHECK(values.device() == keys.device() && indices.device() == keys.device(),
               "keys, values and indices must be on the same device, got ", keys.device(), ", ",
               values.device(), " and ", indices.device());
  SNAPKV_CHECK(keys.numel() > 0, "keys must be non-empty, got ", shape_str(keys));
  const int64_t L = keys.size(2);
  SNAPKV_CHECK(window_size >= 1 && window_size < L, "window_size must be in [1, L - 1] with L = ", L,
               ", got ", window_size);
  SNAPKV_CHECK(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  SNAPKV_CHECK(indices.dim() == 3 && indices.size(0) == keys.size(0) && indices.size(1) == keys.size(1),
               "indices must be [B, H_kv, k] = [", keys.size(0), ", ", keys.size(1), ", k], got ",
               shape_str(indices));
  SNAPKV_CHECK(indices.size(2) <= L - window_size, "indices must select at most L - window_size = ",
               L - window_size, " positions, got k = ", indices.size(2));
  if (check_values && indices.numel() > 0) {
    auto mm = at::aminmax(indices);
    const int64_t lo = std::get<0>(mm).item<int64_t>();
    const int64_t hi = std::get<1>(mm).item<int64_t>();
    SNAPKV_CHECK(lo >= 0 && hi < L - window_size, "indices must lie in [0, L - window_size) = [0, ",
                 L - window_size, "), got min ", lo, " max ", hi);
  }
}

void check_kv_out(const at::Tensor& keys, const at::Tensor& values, int64_t rows, const char* rows_name,
                  const at::Tensor& keys_out, const at::Tensor& values_out) {
  const std::vector<int64_t> want{keys.size(0), keys.size(1), rows, keys.size(3)};
  for (const auto* t : {&keys_out, &values_out}) {
    const char* name = t == &keys_out ? "keys_out" : "values_out";
    SNAPKV_CHECK(t->sizes() == at::IntArrayRef(want), name, " must be [B, H_kv, ", rows_name, ", D] = ",
                 at::IntArrayRef(want), ", got ", shape_str(*t));
    SNAPKV_CHECK(t->scalar_type() == keys.scalar_type(), name, " must have the dtype of keys (",
                 keys.scalar_type(), "), got ", t->scalar_type());
    SNAPKV_CHECK(t->device() == keys.device(), name, " must be on ", keys.device(), ", got ", t->device());
    SNAPKV_CHECK(t->stride(3) == 1, name, " must be contiguous in its last dim, got strides ",
                 t->strides());
    // Rows are read and written in parallel: any shared memory could be overwritten before it is read.
    SNAPKV_CHECK(!t->is_alias_of(keys) && !t->is_alias_of(values), name,
                 " must not share memory with the input keys or values");
  }
  SNAPKV_CHECK(!keys_out.is_alias_of(values_out), "keys_out and values_out must not share memory");
}

RaggedShape check_ragged_attention_args(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                        const at::Tensor& starts, const at::Tensor& lengths, double scale,
                                        const c10::optional<double>& softcap, bool check_values) {
  SNAPKV_CHECK(q.dim() == 4, "q must be [B, H_q, n, D], got ", shape_str(q));
  SNAPKV_CHECK(keys.dim() == 2, "keys must be [N, D], got ", shape_str(keys));
  SNAPKV_CHECK(values.dim() == 2, "values must be [N, D], got ", shape_str(values));
  check_float(q, "q");
  SNAPKV_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
               "keys and values must have the dtype of q (", q.scalar_type(), "), got ", keys.scalar_type(),
               " and ", values.scalar_type());
  SNAPKV_CHECK(keys.device() == q.device() && values.device() == q.device() && starts.device() == q.device() &&
                   lengths.device() == q.device(),
               "keys, values, starts and lengths must be on the device of q (", q.device(), "), got ",
               keys.device(), ", ", values.device(), ", ", starts.device(), " and ", lengths.device());
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), D = q.size(3), N = keys.size(0);
  SNAPKV_CHECK(B > 0 && Hq > 0 && n > 0 && D > 0, "q must be non-empty, got ", shape_str(q));
  SNAPKV_CHECK(keys.size(1) == D, "keys must be [N, D] with the head dim of q (D = ", D, "), got ",
               shape_str(keys));
  SNAPKV_CHECK(values.sizes() == keys.sizes(), "values must have the shape of keys ", shape_str(keys), ", got ",
               shape_str(values));
  SNAPKV_CHECK(q.stride(3) == 1 || D == 1, "q must be contiguous in its last dim, got strides ", q.strides());
  SNAPKV_CHECK(keys.stride(1) == 1 || D == 1, "keys must have contiguous rows (stride(1) == 1), got strides ",
               keys.strides());
  SNAPKV_CHECK(values.stride(1) == 1 || D == 1, "values must have contiguous rows (stride(1) == 1), got strides ",
               values.strides());
  SNAPKV_CHECK(starts.scalar_type() == at::kLong, "starts must be int64, got ", starts.scalar_type());
  SNAPKV_CHECK(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());
  SNAPKV_CHECK(starts.dim() == 2 && starts.size(0) == B && starts.size(1) > 0,
               "starts must be [B, H_kv] with B = q.size(0) = ", B, " and H_kv > 0, got ", shape_str(starts));
  SNAPKV_CHECK(lengths.sizes() == starts.sizes(), "lengths must have the shape of starts ", shape_str(starts),
               ", got ", shape_str(lengths));
  const int64_t Hkv = starts.size(1);
  SNAPKV_CHECK(Hq % Hkv == 0, "H_q must be a multiple of H_kv (GQA), got H_q = ", Hq, " and H_kv = ", Hkv);
  SNAPKV_CHECK(std::isfinite(scale) && scale > 0 && static_cast<float>(scale) > 0.f &&
                   std::isfinite(static_cast<float>(scale)),
               "scale must be finite and positive, got ", scale);
  resolve_softcap(softcap);
  RaggedShape s{B, Hq, Hkv, n, D, N, -1};
  if (!check_values) return s;
  // min length, min start, max end, max length: read in place on CPU; on CUDA one small
  // device-to-host copy (a host sync), as compact's index check.
  int64_t v[4];
  if (starts.is_cpu()) {
    const at::Tensor st = starts.contiguous(), ln = lengths.contiguous();
    const int64_t* sp = st.data_ptr<int64_t>();
    const int64_t* lp = ln.data_ptr<int64_t>();
    v[0] = v[3] = lp[0];
    v[1] = sp[0];
    v[2] = sp[0] + lp[0];
    for (int64_t i = 1; i < B * Hkv; ++i) {
      v[0] = std::min(v[0], lp[i]);
      v[1] = std::min(v[1], sp[i]);
      v[2] = std::max(v[2], sp[i] + lp[i]);
      v[3] = std::max(v[3], lp[i]);
    }
  } else {
    const at::Tensor r =
        at::stack({lengths.min(), starts.min(), (starts + lengths).max(), lengths.max()}).to(at::kCPU);
    for (int i = 0; i < 4; ++i) v[i] = r[i].item<int64_t>();
  }
  SNAPKV_CHECK(v[0] >= n, "lengths must be >= n = q.size(2) = ", n,
               " (a segment holds its n new tokens last), got min ", v[0]);
  SNAPKV_CHECK(v[1] >= 0 && v[2] <= N, "segments must lie in the store: need starts >= 0 and starts + lengths <= N = ",
               N, ", got min start ", v[1], " and max end ", v[2]);
  s.max_len = v[3];
  return s;
}

std::vector<int64_t> pad_values(const c10::optional<at::Tensor>& pad_lengths, int64_t B) {
  if (!pad_lengths.has_value()) return std::vector<int64_t>(B, 0);
  const at::Tensor p = pad_lengths->to(at::kCPU).contiguous();
  const int64_t* v = p.data_ptr<int64_t>();
  return std::vector<int64_t>(v, v + B);
}

float resolve_scale(const c10::optional<double>& scale, int64_t head_dim) {
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  SNAPKV_CHECK(std::isfinite(s) && s > 0, "scale must be finite and positive, got ", s);
  return static_cast<float>(s);
}

float resolve_softcap(const c10::optional<double>& softcap) {
  if (!softcap.has_value()) return 0.f;
  const double c = *softcap;
  // As the float the kernels use: finite there too, and not so small that it rounds to 0 (no cap).
  const bool ok = std::isfinite(c) && c > 0 && c <= std::numeric_limits<float>::max() &&
                  static_cast<float>(c) > 0.f;
  SNAPKV_CHECK(ok, "softcap must be None or finite and positive, got ", c);
  return static_cast<float>(c);
}

}  // namespace snapkv
