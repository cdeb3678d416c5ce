"""Selection policies side by side: KV memory and the decode step, at equal total budget.

    python benchmarks/bench_policies.py                                   # SmolLM2 on CPU, 2K/4K, 25%
    python benchmarks/bench_policies.py --model llama2-7b --layers 4 --lengths 2048   # a 7B shape, random weights
    python benchmarks/bench_policies.py --model llama3-8b --device cuda --dtype bfloat16 --lengths 16384 32768

Per prompt length, every policy's SnapKVCache is filled from the same prompt; then:
- memory: the KV bytes each cache holds (``cache.stats()["kv_bytes"]``), against the dense SnapKV
  cache of the same budget and against masked (kvpress-style) layouts of the same selection: a
  dense buffer per layer as long as its longest head (``padded``), every layer as long as the
  longest head of any layer (``uniform padded``: one static buffer shape), and the whole prompt
  with the dropped entries masked (``masked full``: what kvpress's AdaKV holds);
- decode: one decoding step timed for each cache in turn (the caches round-robin, step by step,
  so machine noise hits them alike; each grows by one token a step), the median over the steps.
  The ratio that matters: a per-head policy's step against the dense SnapKV cache holding the same
  total number of entries (``vs snapkv``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import timed  # noqa: E402

from snapkv_ext import SnapKVCache  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from snapkv_ext.policies import POLICIES  # noqa: E402
from snapkv_ext.tools.haystack import haystack  # noqa: E402
from snapkv_ext.tools.models import RANDOM_SHAPES, load_by_name, random_model  # noqa: E402


def prompt_ids(tok, n, vocab, device):
    if tok is None:
        return torch.randint(10, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    ids = tok(" ".join(haystack(n // 15 + 10)), return_tensors="pt")["input_ids"][:, :n]
    assert ids.shape[1] == n, f"haystack too short for {n} tokens"
    return ids.to(device)


def layouts(cache, L: int) -> dict:
    """KV bytes of the cache as held, and of the dense / masked layouts of the same selection."""
    held = padded = full = 0
    longest, n_layers, row_bytes = 0, 0, 0
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            continue
        lengths = layer.kept_lengths()
        B, H = lengths.shape
        per_entry = layer.entry_bytes() // (B * H)  # keys + values of one (row, head) entry
        held += int(lengths.sum()) * per_entry
        padded += B * H * int(lengths.max()) * per_entry
        full += B * H * L * per_entry
        longest, n_layers, row_bytes = max(longest, int(lengths.max())), n_layers + 1, B * H * per_entry
    return dict(kv_bytes=cache.stats()["kv_bytes"], kept_bytes=held, padded_bytes=padded,
                uniform_padded_bytes=n_layers * longest * row_bytes, masked_full_bytes=full)


def bench_length(model, tok, L, args):
    dev = args.device
    ids = prompt_ids(tok, L, model.config.vocab_size, dev)
    caches, first = {}, None
    for name in args.policies:
        cache = SnapKVCache(model, compression_ratio=args.compression_ratio, window_size=args.window_size,
                            kernel_size=args.kernel_size, policy=name, decode_reserve=args.steps + 8)
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        first = logits[:, -1:].argmax(-1) if first is None else first
        caches[name] = cache
        gc.collect()
    rows = {name: dict(layouts(c, L), kept_entries=sum(c.stats()["kept_entries"])) for name, c in caches.items()}
    toks = {name: first for name in caches}
    times = {name: [] for name in caches}
    with torch.no_grad():
        for _ in range(args.steps + 1):  # round-robin; the first step of each is warm-up
            for name, cache in caches.items():
                dt, logits = timed(lambda: model(toks[name], **cache_kwargs(model, cache), use_cache=True).logits, dev)
                toks[name] = logits[:, -1:].argmax(-1)
                times[name].append(dt * 1e3)
    for name in caches:
        rows[name]["decode_ms"] = statistics.median(times[name][1:])
    base = rows.get("snapkv")
    for name, r in rows.items():
        if base is not None:
            r["decode_vs_snapkv"] = r["decode_ms"] / base["decode_ms"]
            r["bytes_vs_snapkv"] = r["kv_bytes"] / base["kv_bytes"]
        r["masked_full_vs_held"] = r["masked_full_bytes"] / r["kv_bytes"]
        r["padded_vs_held"] = r["padded_bytes"] / r["kv_bytes"]
        r["uniform_padded_vs_held"] = r["uniform_padded_bytes"] / r["kv_bytes"]
    del caches
    gc.collect()
    return rows


def allocation_share(shape: str, L: int, budget: int, window: int = 32, reps: int = 20, dtype=torch.float32):
    """One layer's compression under AdaKV on random inputs, split into its parts (median ms):
    scoring (window_scores + pool_scores, the native ops), the cross-head allocation
    (head_counts + keep_mask, plain torch) and the store (the kept rows gathered). Whether the
    allocation needs a native op: its share of the whole."""
    from snapkv_ext import ops
    from snapkv_ext.policies import AdaKV, keep_mask, valid_prefix

    cfg = RANDOM_SHAPES[shape] if shape in RANDOM_SHAPES else dict(num_attention_heads=9, num_key_value_heads=3,
                                                                    hidden_size=576)
    Hq, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"] // Hq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, window, D, generator=g).to(dtype)
    k = torch.randn(1, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(1, Hkv, L, D, generator=g).to(dtype)
    pos = torch.arange(L).expand(1, Hkv, L)
    policy, parts = AdaKV(), {"score": [], "allocate": [], "store": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        sc = ops.pool_scores(ops.window_scores(q, k, None, "mean"), 7, "max", None)
        t1 = time.perf_counter()
        valid = valid_prefix(None, 1, Hkv, sc.shape[-1], sc.device)
        keep = keep_mask(sc, policy.head_counts(sc, budget - window, valid), None, window)
        t2 = time.perf_counter()
        _ = (k[keep], v[keep], pos[keep])
        t3 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[name].append(dt * 1e3)
    out = {name: statistics.median(ts) for name, ts in parts.items()}
    out["allocate_share"] = out["allocate"] / sum(out[n] for n in ("score", "allocate", "store"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", *RANDOM_SHAPES])
    p.add_argument("--layers", type=int, default=None, help="a random shape with this many layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--compression-ratio", type=float, default=0.25)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per cache")
    p.add_argument("--json", default=None)
    p.add_argument("--allocation", action="store_true",
                   help="only the AdaKV allocation's share of one layer's compression (random inputs)")
    args = p.parse_args()
    if args.allocation:
        for shape in ("smollm2", "llama3-8b", "llama2-7b"):
            for L in args.lengths:
                r = allocation_share(shape, L, max(33, int(args.compression_ratio * L)))
                print(f"{shape:10s} L={L:6d} score {r['score']:8.3f} ms  allocate {r['allocate']:8.3f} ms  "
                      f"store {r['store']:8.3f} ms  allocation share {100 * r['allocate_share']:.1f}%", flush=True)
        return
    if args.model in RANDOM_SHAPES:
        model, tok = random_model(args.model, args.device, getattr(torch, args.dtype), layers=args.layers), None
    else:
        model, tok = load_by_name(args.model, args.device, args.dtype)
    out = []
    load_before = os.getloadavg()[0]
    for L in args.lengths:
        rows = bench_length(model, tok, L, args)
        out.append(dict(L=L, rows=rows))
        for name, r in rows.items():
            print(f"L={L:6d} {name:14s} decode {r['decode_ms']:8.2f} ms (x{r.get('decode_vs_snapkv', 1):.3f} snapkv) | "
                  f"KV {r['kv_bytes'] / 2**20:8.2f} MB (x{r.get('bytes_vs_snapkv', 1):.3f} snapkv; kept "
                  f"{r['kept_bytes'] / 2**20:.2f}; padded to the longest head {r['padded_bytes'] / 2**20:.2f} = "
                  f"x{r['padded_vs_held']:.2f}; every layer as the longest {r['uniform_padded_bytes'] / 2**20:.2f} = "
                  f"x{r['uniform_padded_vs_held']:.2f}; masked full {r['masked_full_bytes'] / 2**20:.2f} = "
                  f"x{r['masked_full_vs_held']:.2f})", flush=True)
    load_after = os.getloadavg()[0]
    print(f"load average {load_before:.2f} before, {load_after:.2f} after")
    if args.json:
        meta = dict(model=args.model, layers=args.layers, device=args.device, dtype=args.dtype, torch=torch.__version__,
                    threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                    date=time.strftime("%Y-%m-%d"), argv=sys.argv, load=[load_before, load_after])
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=out), f, indent=1)


if __name__ == "__main__":
    main()
