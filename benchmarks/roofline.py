"""Bytes, FLOPs and the expected time of each CUDA op on A100 and H100, from the kernels' design
(csrc/cuda/*_kernels.cuh): the roofline table of benchmarks/RESULTS.md, section 6.

    python benchmarks/roofline.py [--lengths 32768 131072] [--max-capacity-prompt 2048]

Per op, what the kernels move through global memory and compute (bf16 inputs):
- window_scores: two passes (softmax statistics, then votes), each reading the keys once when the
  group's G*w query rows fit one row block (<= 128 rows; otherwise once per block), plus the
  window queries per CTA, the chunk partials and the fp32 output. FLOPs: 2 * H_q * w * L * D per
  pass on tensor cores, exp per logit (two per logit overall) on the SFUs.
- pool_scores: read and write [B, H_kv, N] fp32.
- select_topk: four digit passes plus a count and a write pass over [B, H_kv, N] fp32
  (sliced path; the one-CTA-per-row path reads the same), 10 launches.
- compact: read and write (k + w) rows of keys and values.
- ragged_attention (decode, n new tokens): each kept entry's key and value rows read once
  (kept entries * 2 * D * elem bytes: one CTA holds all G * n query rows of its KV head), the
  queries and the output, plus the split partials (fp32 acc + stats, written and read once by the
  combine kernel) when a segment is split over CTAs. FLOPs: 4 * H_q * n * T * D (q.k and p.v) on
  CUDA cores, one exp per logit. Always bandwidth-bound for n <= ~16.
Expected time = max(bytes / HBM bandwidth, FLOPs / tensor peak, shared-memory bytes / shared-memory
bandwidth (128 B per clock per SM)) plus a launch floor per kernel,
with no credit for L2 (the votes pass walks the CTAs in the reverse order of the statistics pass,
so on an H100 up to ~40 MB of its key reads can hit L2: the figures are an upper bound);
the measured numbers replace these whenever a GPU is lent (bench_ops.py --device cuda).
"""
from __future__ import annotations

import argparse

SHAPES = {  # name: (H_q, H_kv, D)
    "llama3-8b": (32, 8, 128),
    "lwm-7b": (32, 32, 128),
}
GPUS = {  # name: (HBM bytes/s, dense bf16 tensor FLOP/s, launch floor s, shared-memory bytes/s)
    "A100": (2.0e12, 312e12, 3e-6, 108 * 128 * 1.41e9),
    "H100": (3.35e12, 989e12, 2.5e-6, 132 * 128 * 1.83e9),
}
W = 32
ROW_BLOCK = 128


def op_costs(H_q, H_kv, D, L, max_capacity_prompt, B=1, es=2):
    """-> {op: (bytes, flops, launches)}"""
    N = L - W
    G = H_q // H_kv
    R = G * W
    blocks = -(-R // ROW_BLOCK)
    key_bytes = B * H_kv * L * D * es
    ctas = max(2 * 132, B * H_kv)  # the plan's ~two waves per pass
    q_reads = ctas * min(R, ROW_BLOCK) * blocks * D * es  # each CTA loads its query block(s)
    ws_bytes = 2 * blocks * key_bytes + 2 * q_reads + B * H_kv * N * 4
    ws_flops = 2 * (2 * B * H_q * W * L * D)
    # Shared memory per pass: WMMA fragment loads (a warp unit of NR 16-row fragments and two
    # 16-key fragments loads NR + 2 fragments of 512 B per 2 * NR products of 4096 MACs), the fp32
    # logit tile stored and read back (8 B per logit), the key tile written by the async copies.
    # With a 128-row block, 16-bit inputs and D <= 128 the query fragments stay in registers
    # (QFrags): a unit then loads only its two key fragments per k step.
    rows = min(-(-R // 16) * 16, ROW_BLOCK)
    nr = 2 if rows >= 128 else 1
    loads = 2 if (rows == ROW_BLOCK and es == 2 and D <= 128) else nr + 2
    macs = B * H_q * W * L * D
    ws_smem = 2 * (macs * loads * 512 / (2 * nr * 4096) + 8 * B * H_q * W * L + blocks * key_bytes)
    scores = B * H_kv * N * 4
    k = max_capacity_prompt - W
    rows_bytes = B * H_kv * (k + W) * D * es
    return {
        "window_scores": (ws_bytes, ws_flops, 3, ws_smem),
        "pool_scores": (2 * scores, 0, 1, 0),
        "select_topk": (6 * scores, 0, 10, 0),
        "compact": (2 * 2 * rows_bytes, 0, 1, 0),
    }, key_bytes


def ragged_costs(H_q, H_kv, D, T, B=1, n=1, es=2, sm_count=132):
    """-> (bytes, flops, launches) of ragged_attention over T kept entries per KV head."""
    kv_bytes = B * H_kv * T * 2 * D * es
    G = H_q // H_kv
    tiles = -(-T // 32)
    ctas_per_seg = -(-2 * sm_count // (B * H_kv))
    per = max(-(-tiles // ctas_per_seg), 4)
    splits = -(-tiles // per)
    part = 2 * B * H_kv * splits * G * n * (D + 2) * 4 if splits > 1 else 0
    qo = 2 * B * H_q * n * D * es
    return kv_bytes + qo + part, 4 * B * H_q * n * T * D, 2 if splits > 1 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--max-capacity-prompt", type=int, default=2048)
    ap.add_argument("--decode", action="store_true", help="the ragged_attention (decode) table instead")
    a = ap.parse_args()
    if a.decode:
        print("| shape | T | B | MB moved | GFLOP | A100 µs | H100 µs |")
        print("|---|---|---|---|---|---|---|")
        for name, (H_q, H_kv, D) in {"smollm2": (9, 3, 64), **SHAPES}.items():
            for T, B in ((2048, 1), (8192, 1), (8192, 8)):
                nbytes, flops, launches = ragged_costs(H_q, H_kv, D, T, B)
                t = {g: max(nbytes / bw, flops / peak) + launches * floor for g, (bw, peak, floor, _) in GPUS.items()}
                print(f"| {name} | {T // 1024}K | {B} | {nbytes / 1e6:.2f} | {flops / 1e9:.3f} | "
                      f"{t['A100'] * 1e6:.1f} | {t['H100'] * 1e6:.1f} |")
        return
    print("| shape | L | op | MB moved | GFLOP | MB through smem | A100 µs | H100 µs |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (H_q, H_kv, D) in SHAPES.items():
        for L in a.lengths:
            costs, key_bytes = op_costs(H_q, H_kv, D, L, a.max_capacity_prompt)
            total = {g: 0.0 for g in GPUS}
            for op, (nbytes, flops, launches, smem) in costs.items():
                t = {}
                for g, (bw, peak, floor, smem_bw) in GPUS.items():
                    t[g] = max(nbytes / bw, flops / peak, smem / smem_bw) + launches * floor
                    total[g] += t[g]
                print(f"| {name} | {L // 1024}K | {op} | {nbytes / 1e6:.1f} | {flops / 1e9:.1f} | "
                      f"{smem / 1e6:.0f} | {t['A100'] * 1e6:.0f} | {t['H100'] * 1e6:.0f} |")
            print(f"| {name} | {L // 1024}K | **fused** | | | | **{total['A100'] * 1e6:.0f}** | "
                  f"**{total['H100'] * 1e6:.0f}** |")
            one_read = {g: key_bytes / v[0] for g, v in GPUS.items()}
            print(f"| {name} | {L // 1024}K | (keys read once: {key_bytes / 1e6:.0f} MB) | | | | "
                  f"{one_read['A100'] * 1e6:.0f} | {one_read['H100'] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
