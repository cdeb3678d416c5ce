// CPU window scoring: the softmax votes of the window queries, per KV head, without the
// [B, H_q, w, L] attention matrix.
//
// For each (batch row, KV head) the R = G*w window queries of the group are scored against the
// keys one block of kBlock keys at a time (a register-tiled fp32 micro-kernel writing the block's
// logits transposed, [keys, rows], so that per-row statistics vectorise over rows):
//   pass 1: every row's softmax statistics (max, sum) over the keys it sees, merged per block;
//   pass 2: for the prefix keys, sum exp(logit - lse) over each head's window, combine groups.
// Pass 2 needs pass 1's log-sum-exp, so the logits are either recomputed (extra memory per worker:
// one [kBlock, R] block) or, when it fits the O(B*H_kv*L) budget, kept from pass 1 (one [L, R]
// buffer per worker, used only while workers * R <= 2 * B * H_kv, e.g. full multi-head attention).
// With a soft-cap (Gemma 2), each block's scaled logits are capped right after they are computed,
// before the causal mask, so both passes (and kept logits) see the capped values.
#include <ATen/ATen.h>

#include <vector>

#include "cpu_parallel.h"
#include "cpu_math.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {
namespace {

constexpr int64_t kBlock = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

at::Tensor window_scores_cpu(const at::Tensor& q_window, const at::Tensor& keys,
                             const c10::optional<at::Tensor>& pad_lengths,
                             const std::string& group_reduce, c10::optional<double> scale_opt,
                             c10::optional<double> softcap_opt) {
  const WindowShape s = window_shape(q_window, keys);
  const GroupReduce reduce = parse_group_reduce(group_reduce);
  const float scale = resolve_scale(scale_opt, s.D);
  const float softcap = resolve_softcap(softcap_opt);
  const int64_t G = s.group(), R = G * s.w, N = s.L - s.w, D = s.D, L = s.L, w = s.w;
  const int64_t ldr = round_up(R, 32);

  const auto f32 = keys.options().dtype(at::kFloat);
  // The queries in the layout the logit kernel reads; row r = g*w + i is query head kv*G + g,
  // window query i, rows padded with zeros to ldr. Either
  //   qp[b, kv, e, r] = (q[r][2e], q[r][2e+1]), unscaled bf16 pairs, for the AVX512-BF16 kernel
  //     (bf16 keys and queries on a CPU that has it), or
  //   qt[b, kv, d, r]: pre-scaled fp32 queries, transposed, for the fp32 kernels.
  const bool bf16_dot = keys.scalar_type() == at::kBFloat16 && D % 2 == 0 && cpu::has_bf16_dot();
  at::Tensor qp, qt;
  if (bf16_dot) {
    at::Tensor padded = at::zeros({s.B, s.Hkv, ldr, D}, q_window.options());
    padded.narrow(2, 0, R).copy_(q_window.reshape({s.B, s.Hkv, R, D}));
    qp = padded.view({s.B, s.Hkv, ldr, D / 2, 2}).permute({0, 1, 3, 2, 4}).contiguous().view(at::kInt);
  } else {
    qt = at::zeros({s.B, s.Hkv, D, ldr}, f32);
    qt.narrow(3, 0, R).copy_((q_window.to(at::kFloat) * scale).reshape({s.B, s.Hkv, R, D}).transpose(2, 3));
  }
  const at::Tensor k = keys.contiguous();
  at::Tensor out = at::zeros({s.B, s.Hkv, N}, f32);
  const std::vector<int64_t> pad = pad_values(pad_lengths, s.B);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), s.B * s.Hkv);
  const bool keep_logits = workers * ldr <= 2 * s.B * s.Hkv;

  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    at::Tensor logits = at::empty({(keep_logits ? round_up(L, kBlock) : kBlock) * ldr}, f32);
    at::Tensor kbuf = k.scalar_type() == at::kHalf ? at::empty({kBlock, D}, f32) : at::Tensor();
    std::vector<SoftmaxStat> stat(R);
    std::vector<float> lse(R), bm(R), bl(R);
    float* lg = logits.data_ptr<float>();

    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.Hkv, p0 = pad[b];
      const float* qh = bf16_dot ? nullptr : qt.data_ptr<float>() + bh * D * ldr;
      const at::Tensor kh = k[b][bh % s.Hkv];  // [L, D]
      float* o = out.data_ptr<float>() + bh * N;

      // Transposed scaled logits of keys [j0, j1): st[(j - j0) * ldr + r].
      auto scaled_logits = [&](int64_t j0, int64_t j1, float* st) {
        const int64_t nb = j1 - j0;
        if (k.scalar_type() == at::kFloat) {
          cpu::block_logits_t(kh.data_ptr<float>() + j0 * D, nb, D, qh, ldr, st);
        } else if (k.scalar_type() == at::kBFloat16) {
          const auto* kb = reinterpret_cast<const uint16_t*>(kh.data_ptr<at::BFloat16>());
#ifdef SNAPKV_CPU_BF16_DOT
          if (bf16_dot) {
            const auto* qb = reinterpret_cast<const uint32_t*>(qp.data_ptr<int32_t>()) + bh * (D / 2) * ldr;
            cpu::block_logits_bf16_dot(kb + j0 * D, nb, D, qb, ldr, scale, st);
            return;
          }
#endif
          cpu::block_logits_t_bf16(kb + j0 * D, nb, D, qh, ldr, st);
        } else {  // float16: widen one block into kbuf
          kbuf.narrow(0, 0, nb).copy_(kh.narrow(0, j0, nb));
          cpu::block_logits_t(kbuf.data_ptr<float>(), nb, D, qh, ldr, st);
        }
      };
      // ... soft-capped when asked (the rows r < R: the padding rows are never read).
      auto block_logits = [&](int64_t j0, int64_t j1, float* st) {
        scaled_logits(j0, j1, st);
        if (softcap > 0.f) cpu::softcap_block(st, j1 - j0, ldr, R, softcap);
      };
      auto block_ptr = [&](int64_t j0) { return keep_logits ? lg + (j0 - p0) * ldr : lg; };

      // Pass 1: softmax statistics of every row over the keys it sees.
      for (int64_t r = 0; r < R; ++r) stat[r] = stat_empty();
      for (int64_t j0 = p0; j0 < L; j0 += kBlock) {
        const int64_t j1 = std::min(L, j0 + kBlock);
        float* st = block_ptr(j0);
        block_logits(j0, j1, st);
        // Inside the window, query i does not see the keys after it (causal).
        for (int64_t j = std::max(j0, N); j < j1; ++j)
          for (int64_t r = 0; r < R; ++r)
            if (!key_visible(j, r % w, L, w, p0)) st[(j - j0) * ldr + r] = neg_inf();
        cpu::block_row_stats(st, j1 - j0, ldr, R, bm.data(), bl.data());
        for (int64_t r = 0; r < R; ++r)
          if (bl[r] > 0.f) stat[r] = stat_merge(stat[r], SoftmaxStat{bm[r], bl[r]});
      }
      for (int64_t r = 0; r < R; ++r) lse[r] = stat_lse(stat[r]);

      // Pass 2: votes of the prefix keys (all visible to every window query), per group head.
      for (int64_t j0 = p0; j0 < N; j0 += kBlock) {
        const int64_t j1 = std::min(N, j0 + kBlock);
        float* st = block_ptr(j0);
        if (!keep_logits) block_logits(j0, j1, st);
        for (int64_t j = j0; j < j1; ++j) {
          const float* row = st + (j - j0) * ldr;
          float acc = group_init(reduce);
          for (int64_t g = 0; g < G; ++g)
            acc = group_combine(reduce, acc, cpu::sum_probs(row + g * w, lse.data() + g * w, w) / static_cast<float>(w));
          o[j] = group_finish(reduce, acc, G);
        }
      }
    }
  });
  return out;
}

}  // namespace snapkv
