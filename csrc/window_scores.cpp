// CPU window scoring: the softmax votes of the window queries, per KV head, without the
// [B, H_q, w, L] attention matrix.
//
// For each (batch row, KV head) the R = G*w window queries of the group are scored against the
// keys one block of kBlock keys at a time (a register-tiled fp32 micro-kernel writing the block's
// logits transposed, [keys, rows], so that per-row statistics vectorise over rows; on the
// portable path, whose tile has no FMA, the BLAS torch ships computes the block instead):
//   pass 1: every row's softmax statistics (max, sum) over the keys it sees, merged per block;
//   pass 2: for the prefix keys, sum exp(logit - max) / sum over each head's window, combine groups.
// The per-head work is compiled once per CPU path (cpu_isa.h), with that path's register tile.
// Pass 2 needs pass 1's statistics, so the logits are either recomputed (extra memory per worker:
// one [kBlock, R] block) or, when it fits the O(B*H_kv*L) budget, kept from pass 1 (one [L, R]
// buffer per worker, used while workers * R <= 2 * B * H_kv, e.g. full multi-head attention, or
// while the workers' buffers total at most kKeepBytes, e.g. GQA prompts up to a few thousand keys).
// Kept, pass 1 stores exp(logit - block max) in place of each logit and the block's max per row,
// so pass 2 multiplies by exp(block max - row max) / sum per row and block: one exp per logit in
// all, not two (the exp is most of the softmax passes' work).
// With a soft-cap (Gemma 2), each block's scaled logits are capped right after they are computed,
// before the causal mask, so both passes (and kept logits) see the capped values.
#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_math.h"
#include "dispatch.h"
#include "snapkv.h"

namespace snapkv {
namespace {

constexpr int64_t kBlock = 256;
// Kept logits of all workers at most this size whatever the output's (8 MiB: Llama-3-8B's 128 rows
// per KV head up to L = 8K on 2 workers), so short GQA prompts skip pass 2's recomputation.
constexpr int64_t kKeepBytes = int64_t{8} << 20;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum class KeyType { F32, BF16, F16 };

// One call's geometry and tensors as raw pointers (the per-path kernel sees no ATen).
struct ScoreJob {
  int64_t Hkv, L, N, D, w, G, R, ldr;
  KeyType key_type;
  const void* keys;        // [B, H_kv, L, D] contiguous
  const float* qt;         // [B, H_kv, D, ldr] pre-scaled fp32 queries, transposed (fp32 kernels)
  const uint32_t* qp;      // [B, H_kv, D / 2, ldr] unscaled bf16 query pairs (AVX512-BF16 kernel)
  float scale, softcap;
  GroupReduce reduce;
  const int64_t* pad;      // [B] left padding
  bool keep_logits;        // pass 1's logits kept for pass 2 (one [L, ldr] buffer per worker)
  float* out;              // [B, H_kv, N]
};

// One worker's buffers.
struct ScoreScratch {
  float* logits;    // [kBlock or round_up(L, kBlock), ldr]
  float* kbuf;      // [kBlock, D]: a bf16/f16 block widened (fp32 kernels)
  SoftmaxStat* stat;  // [R]
  float *m, *inv_l, *bm, *bl;  // [R] each
  float* block_max;   // [blocks of L, R] pass 1's per-block row maxima (kept logits only)
};

// st[nb, ldr] = k[nb, D] x qt[D, ldr] through the BLAS torch ships (a path with kBlasLogits).
// Called from a worker of the parallel loop: the BLAS runs single-threaded there.
void blas_block_logits(const float* k, int64_t nb, int64_t D, const float* qt, int64_t ldr, float* st) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(st, {nb, ldr}, f32);
  at::mm_out(out, at::from_blob(const_cast<float*>(k), {nb, D}, f32), at::from_blob(const_cast<float*>(qt), {D, ldr}, f32));
}

// Whether a path computes fp32 keys' logits through the BLAS (cpu_isa.h's kBlasLogits).
template <class Isa, typename KeyT>
constexpr bool kBlasLogits = Isa::kBlasLogits && std::is_same_v<KeyT, float>;

// Rows r < R of kept logits st[n, ldr] (masked ones -inf): m[r] their max (0 for a row that sees
// none), each logit replaced by exp(logit - m[r]), l[r] their sum; through torch's vectorised
// kernels, the CPU's best, as the BLAS is for the products.
void blas_head_exps(float* st, int64_t n, int64_t ldr, int64_t R, float* m, float* l) {
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor s = at::from_blob(st, {n, ldr}, f32).narrow(1, 0, R);
  at::Tensor mx = at::from_blob(m, {R}, f32), sum = at::from_blob(l, {R}, f32);
  at::amax_out(mx, s, {0});
  mx.masked_fill_(at::isneginf(mx), 0.f);
  s.sub_(mx).exp_();
  at::sum_out(sum, s, {0});
}

template <class Isa>
SNAPKV_AI void block_logits(const float* k, int64_t nb, int64_t D, const float* qt, int64_t ldr, float* st) {
  if constexpr (Isa::kBlasLogits) {
    blas_block_logits(k, nb, D, qt, ldr, st);
  } else {
    cpu::block_logits_t<Isa>(k, nb, D, qt, ldr, st);
  }
}

// Transposed scaled (and soft-capped) logits of keys [j0, j1) of head kh: st[(j - j0) * ldr + r].
template <class Isa, typename KeyT>
SNAPKV_AI void head_block_logits(const ScoreJob& job, const ScoreScratch& ws, const KeyT* kh, int64_t bh, int64_t j0,
                                 int64_t j1, float* st) {
  const int64_t nb = j1 - j0, D = job.D;
  if constexpr (std::is_same_v<KeyT, float>) {
    block_logits<Isa>(kh + j0 * D, nb, D, job.qt + bh * D * job.ldr, job.ldr, st);
  } else {
#ifdef SNAPKV_CPU_X86
    if constexpr (Isa::kIsa == cpu::Isa::Avx512Bf16 && std::is_same_v<KeyT, uint16_t>) {
      if (job.qp != nullptr) {
        cpu::block_logits_bf16_dot(kh + j0 * D, nb, D, job.qp + bh * (D / 2) * job.ldr, job.ldr, job.scale, st);
        if (job.softcap > 0.f) cpu::softcap_block(st, nb, job.ldr, job.R, job.softcap);
        return;
      }
    }
#endif
    cpu::widen_rows(kh + j0 * D, nb * D, ws.kbuf);
    block_logits<Isa>(ws.kbuf, nb, D, job.qt + bh * D * job.ldr, job.ldr, st);
  }
  // Soft-capped when asked (the rows r < R: the padding rows are never read).
  if (job.softcap > 0.f) cpu::softcap_block(st, nb, job.ldr, job.R, job.softcap);
}

// Heads bh in [begin, end): pass 1 (every row's softmax statistics), then pass 2 (the votes).
template <class Isa, typename KeyT>
SNAPKV_AI void score_heads_typed(const ScoreJob& job, int64_t begin, int64_t end, const ScoreScratch& ws) {
  const int64_t L = job.L, N = job.N, D = job.D, w = job.w, G = job.G, R = job.R, ldr = job.ldr;
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t p0 = job.pad[bh / job.Hkv];
    const KeyT* kh = static_cast<const KeyT*>(job.keys) + bh * L * D;
    float* o = job.out + bh * N;
    auto block_ptr = [&](int64_t j0) { return job.keep_logits ? ws.logits + (j0 - p0) * ldr : ws.logits; };

    // Pass 1: softmax statistics of every row over the keys it sees.
    // Inside the window, query i does not see the keys after it (causal).
    auto mask_window = [&](int64_t j0, int64_t j1, float* st) {
      for (int64_t j = std::max(j0, N); j < j1; ++j)
        for (int64_t r = 0; r < R; ++r)
          if (!key_visible(j, r % w, L, w, p0)) st[(j - j0) * ldr + r] = neg_inf();
    };
    for (int64_t r = 0; r < R; ++r) ws.stat[r] = stat_empty();
    const bool whole = kBlasLogits<Isa, KeyT> && job.keep_logits;
    // Kept logits: block b's row maxima at block_max + b * bm_stride (one set for the whole head).
    const int64_t bm_stride = whole ? 0 : R;
    if (whole) {
      // The portable path keeping fp32 logits: one product over all the keys, then the rows' max,
      // exps and sums through torch's own kernels (one call each per head, not one per block).
      head_block_logits<Isa>(job, ws, kh, bh, p0, L, ws.logits);
      mask_window(p0, L, ws.logits);
      blas_head_exps(ws.logits, L - p0, ldr, R, ws.bm, ws.bl);
      std::copy(ws.bm, ws.bm + R, ws.block_max);
      for (int64_t r = 0; r < R; ++r)
        if (ws.bl[r] > 0.f) ws.stat[r] = SoftmaxStat{ws.bm[r], ws.bl[r]};
    }
    for (int64_t j0 = p0; j0 < L && !whole; j0 += kBlock) {
      const int64_t j1 = std::min(L, j0 + kBlock);
      float* st = block_ptr(j0);
      head_block_logits<Isa>(job, ws, kh, bh, j0, j1, st);
      mask_window(j0, j1, st);
      if (job.keep_logits) {
        cpu::block_row_stats<true>(st, j1 - j0, ldr, R, ws.bm, ws.bl);
        std::copy(ws.bm, ws.bm + R, ws.block_max + (j0 - p0) / kBlock * bm_stride);
      } else {
        cpu::block_row_stats(st, j1 - j0, ldr, R, ws.bm, ws.bl);
      }
      for (int64_t r = 0; r < R; ++r)
        if (ws.bl[r] > 0.f) ws.stat[r] = stat_merge(ws.stat[r], SoftmaxStat{ws.bm[r], ws.bl[r]});
    }
    // Each row's max and 1 / sum (0 for a row that sees no key: its probabilities are 0).
    for (int64_t r = 0; r < R; ++r) {
      const bool empty = ws.stat[r].m == -INFINITY;
      ws.m[r] = empty ? 0.f : ws.stat[r].m;
      ws.inv_l[r] = empty ? 0.f : 1.f / ws.stat[r].l;
    }

    // Pass 2: votes of the prefix keys (all visible to every window query), per group head.
    const float inv_w = 1.f / static_cast<float>(w);
    for (int64_t j0 = p0; j0 < N; j0 += kBlock) {
      const int64_t j1 = std::min(N, j0 + kBlock);
      float* st = block_ptr(j0);
      // A kept block holds exp(logit - block max) (every row sees every prefix key, so the block
      // max is finite for r < R): its probabilities are those times exp(block max - row max) / sum.
      if (job.keep_logits) {
        const float* bm = ws.block_max + (j0 - p0) / kBlock * bm_stride;
        for (int64_t r = 0; r < R; ++r) ws.bl[r] = cpu::exp_fast(bm[r] - ws.m[r]) * ws.inv_l[r];
      } else {
        head_block_logits<Isa>(job, ws, kh, bh, j0, j1, st);
      }
      for (int64_t j = j0; j < j1; ++j) {
        const float* row = st + (j - j0) * ldr;
        float acc = group_init(job.reduce);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = g * w;
          const float p = job.keep_logits ? cpu::dot(row + r, ws.bl + r, w) : cpu::sum_probs(row + r, ws.m + r, ws.inv_l + r, w);
          acc = group_combine(job.reduce, acc, p * inv_w);
        }
        o[j] = group_finish(job.reduce, acc, G);
      }
    }
  }
}

template <class Isa>
SNAPKV_AI void score_heads_impl(const ScoreJob& job, int64_t begin, int64_t end, const ScoreScratch& ws) {
  switch (job.key_type) {
    case KeyType::F32: return score_heads_typed<Isa, float>(job, begin, end, ws);
    case KeyType::BF16: return score_heads_typed<Isa, uint16_t>(job, begin, end, ws);
    default: return score_heads_typed<Isa, cpu::Half16>(job, begin, end, ws);
  }
}

SNAPKV_CPU_VARIANTS(void, score_heads, score_heads_impl,
                    (const ScoreJob& job, int64_t begin, int64_t end, const ScoreScratch& ws), (job, begin, end, ws))

}  // namespace

at::Tensor window_scores_cpu(const at::Tensor& q_window, const at::Tensor& keys,
                             const c10::optional<at::Tensor>& pad_lengths,
                             const std::string& group_reduce, c10::optional<double> scale_opt,
                             c10::optional<double> softcap_opt) {
  const WindowShape s = window_shape(q_window, keys);
  const GroupReduce reduce = parse_group_reduce(group_reduce);
  const float scale = resolve_scale(scale_opt, s.D);
  const float softcap = resolve_softcap(softcap_opt);
  const int64_t G = s.group(), R = G * s.w, N = s.L - s.w, D = s.D, L = s.L;
  const int64_t ldr = round_up(R, 32);

  const auto f32 = keys.options().dtype(at::kFloat);
  // The queries in the layout the logit kernel reads; row r = g*w + i is query head kv*G + g,
  // window query i, rows padded with zeros to ldr. Either
  //   qp[b, kv, e, r] = (q[r][2e], q[r][2e+1]), unscaled bf16 pairs, for the AVX512-BF16 kernel
  //     (bf16 keys and queries on the avx512bf16 path), or
  //   qt[b, kv, d, r]: pre-scaled fp32 queries, transposed, for the fp32 kernels.
  const cpu::Isa isa = cpu::active_isa();  // one path for the whole call
  const bool bf16_dot = keys.scalar_type() == at::kBFloat16 && D % 2 == 0 && isa == cpu::Isa::Avx512Bf16;
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

  ScoreJob job;
  job.Hkv = s.Hkv;
  job.L = L;
  job.N = N;
  job.D = D;
  job.w = s.w;
  job.G = G;
  job.R = R;
  job.ldr = ldr;
  job.key_type = k.scalar_type() == at::kFloat ? KeyType::F32 : k.scalar_type() == at::kBFloat16 ? KeyType::BF16 : KeyType::F16;
  job.keys = k.data_ptr();
  job.qt = bf16_dot ? nullptr : qt.data_ptr<float>();
  job.qp = bf16_dot ? reinterpret_cast<const uint32_t*>(qp.data_ptr<int32_t>()) : nullptr;
  job.scale = scale;
  job.softcap = softcap;
  job.reduce = reduce;
  job.pad = pad.data();
  job.keep_logits = workers * ldr <= 2 * s.B * s.Hkv ||
                    workers * round_up(L, kBlock) * ldr * static_cast<int64_t>(sizeof(float)) <= kKeepBytes;
  job.out = out.data_ptr<float>();

  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t begin, int64_t end) {
    // Uninitialised (every entry read is written first): a kept [L, ldr] block is MBs.
    std::unique_ptr<float[]> logits(new float[(job.keep_logits ? round_up(L, kBlock) : kBlock) * ldr]);
    std::unique_ptr<float[]> kbuf(new float[job.key_type == KeyType::F32 || bf16_dot ? 1 : kBlock * D]);
    std::vector<SoftmaxStat> stat(R);
    std::vector<float> m(R), inv_l(R), bm(R), bl(R);
    std::vector<float> block_max(job.keep_logits ? round_up(L, kBlock) / kBlock * R : 0);
    const ScoreScratch ws{logits.get(), kbuf.get(), stat.data(), m.data(), inv_l.data(), bm.data(), bl.data(),
                          block_max.data()};
    score_heads_for(isa)(job, begin, end, ws);
  });
  return out;
}

}  // namespace snapkv
