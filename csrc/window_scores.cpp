// CPU window scoring: the softmax votes of the window queries, per KV head, without ever
// holding more than one block of attention logits per worker.
//
// For each (batch row, KV head) the G*w window queries of the group are scored against the keys
// one block of kBlock keys at a time (an fp32 GEMM on the block, then vectorised exp):
//   pass 1: every row's softmax statistics (max, sum) over the keys it sees;
//   pass 2: for the prefix keys only, add exp(logit - lse) into the head's vote, combine groups.
// Extra memory per worker: the fp32 queries of one group and one [G*w, kBlock] block, i.e.
// O(B*H_kv*L) at most, never the [B, H_q, w, L] attention matrix.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_math.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {
namespace {

constexpr int64_t kBlock = 512;

}  // namespace

at::Tensor window_scores_cpu(const at::Tensor& q_window, const at::Tensor& keys,
                             const c10::optional<at::Tensor>& pad_lengths,
                             const std::string& group_reduce, c10::optional<double> scale_opt) {
  const WindowShape s = window_shape(q_window, keys);
  const GroupReduce reduce = parse_group_reduce(group_reduce);
  const float scale = resolve_scale(scale_opt, s.D);
  const int64_t G = s.group(), R = G * s.w, N = s.L - s.w, D = s.D, L = s.L, w = s.w;

  // [B, H_kv, G*w, D] fp32, pre-scaled: row (g, i) is query head kv*G + g, window query i.
  const at::Tensor q = (q_window.to(at::kFloat) * scale).contiguous().view({s.B, s.Hkv, R, D});
  const at::Tensor k = keys.contiguous();
  const bool keys_fp32 = k.scalar_type() == at::kFloat;
  at::Tensor out = at::zeros({s.B, s.Hkv, N}, q.options());
  std::vector<int64_t> pad(s.B, 0);
  if (pad_lengths.has_value()) {
    auto p = pad_lengths->cpu();
    for (int64_t b = 0; b < s.B; ++b) pad[b] = p[b].item<int64_t>();
  }

  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    auto f32 = q.options();
    at::Tensor logits = at::empty({R, kBlock}, f32);
    at::Tensor kbuf = keys_fp32 ? at::Tensor() : at::empty({kBlock, D}, f32);
    std::vector<SoftmaxStat> stat(R);
    std::vector<float> lse(R), vote(kBlock);
    float* lg = logits.data_ptr<float>();

    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.Hkv, h = bh % s.Hkv, p0 = pad[b];
      const at::Tensor qh = q[b][h];    // [R, D]
      const at::Tensor kh = k[b][h];    // [L, D]
      float* o = out.data_ptr<float>() + bh * N;

      // logits[r, j - j0] = q_r . k_j for j in [j0, j1).
      auto block_logits = [&](int64_t j0, int64_t j1) {
        const int64_t nb = j1 - j0;
        at::Tensor kb = kh.narrow(0, j0, nb);
        if (!keys_fp32) kb = kbuf.narrow(0, 0, nb).copy_(kb);
        at::Tensor lt = logits.narrow(1, 0, nb);
        at::mm_out(lt, qh, kb.t());
        return lt.stride(0);
      };

      // Pass 1: softmax statistics of every row over the keys it sees.
      for (int64_t r = 0; r < R; ++r) stat[r] = stat_empty();
      for (int64_t j0 = p0; j0 < L; j0 += kBlock) {
        const int64_t j1 = std::min(L, j0 + kBlock);
        const int64_t ld = block_logits(j0, j1);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = r % w;
          // Visible keys of row r inside the block form one range: [j0, min(j1, L - w + i + 1)).
          const int64_t hi = std::min(j1, L - w + i + 1);
          if (hi <= j0) continue;
          const float* row = lg + r * ld;
          const float m = cpu::row_max(row, hi - j0);
          stat[r] = stat_merge(stat[r], SoftmaxStat{m, cpu::row_sum_exp(row, hi - j0, m)});
        }
      }
      for (int64_t r = 0; r < R; ++r) lse[r] = stat_lse(stat[r]);

      // Pass 2: votes of the prefix keys (all visible to every window query), per group head.
      for (int64_t j0 = p0; j0 < N; j0 += kBlock) {
        const int64_t j1 = std::min(N, j0 + kBlock), nb = j1 - j0;
        const int64_t ld = block_logits(j0, j1);
        for (int64_t j = 0; j < nb; ++j) o[j0 + j] = group_init(reduce);
        for (int64_t g = 0; g < G; ++g) {
          std::fill(vote.begin(), vote.begin() + nb, 0.f);
          for (int64_t i = 0; i < w; ++i) {
            const int64_t r = g * w + i;
            cpu::add_probs(lg + r * ld, nb, lse[r], vote.data());
          }
          for (int64_t j = 0; j < nb; ++j)
            o[j0 + j] = group_combine(reduce, o[j0 + j], vote[j] / static_cast<float>(w));
        }
        for (int64_t j = 0; j < nb; ++j) o[j0 + j] = group_finish(reduce, o[j0 + j], G);
      }
    }
  });
  return out;
}

}  // namespace snapkv
