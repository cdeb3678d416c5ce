"""End-to-end benchmark: prefill and decoding with SnapKVCache against DynamicCache, side by side.

    python benchmarks/bench_generate.py                                  # SmolLM2 on CPU, 2K/4K/8K, budget 1024
    python benchmarks/bench_generate.py --model llama2-7b --device cuda --dtype bfloat16 \
        --lengths 16384 --batch 2 --max-capacity-prompt 2048             # random weights, the paper's shape
    python benchmarks/bench_generate.py --model llama2-7b --device cuda --max-length-search

Per prompt length, interleaving the methods so that machine noise hits both alike:
- prefill: median time of the prompt's forward (logits of the last token only, as generate does)
  with DynamicCache and with SnapKVCache; the overhead of compressing is their ratio;
- decode: median time of one decoding step with (a) SnapKVCache after compression, (b) a
  DynamicCache holding a prompt of the same physical length, (c) the full DynamicCache;
- KV memory: bytes each cache holds after the prompt, and the budget arithmetic
  layers * 2 * B * H_kv * budget * D * dtype size.
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
from transformers import DynamicCache  # noqa: E402

from snapkv_ext import SnapKVCache  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from common import timed  # noqa: E402
from snapkv_ext.tools.evaluate import cache_bytes  # noqa: E402
from snapkv_ext.tools.haystack import haystack  # noqa: E402
from snapkv_ext.tools.models import RANDOM_SHAPES, load_by_name  # noqa: E402


def prompt_ids(tok, n, batch, vocab, device):
    if tok is None:
        g = torch.Generator().manual_seed(n)
        return torch.randint(10, vocab, (batch, n), generator=g).to(device)
    text = " ".join(haystack(n // 15 + 10))
    ids = tok(text, return_tensors="pt")["input_ids"][:, :n]
    assert ids.shape[1] == n, f"haystack too short for {n} tokens"
    return ids.expand(batch, n).contiguous().to(device)


def prefill(model, ids, cache):
    with torch.no_grad():
        return model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits


def decode_ms(model, cache, steps, device, first_token):
    """Median ms of one decoding step (greedy, fed back)."""
    tok = first_token
    times = []
    with torch.no_grad():
        for _ in range(steps):
            dt, logits = timed(lambda: model(tok, **cache_kwargs(model, cache), use_cache=True).logits, device)
            tok = logits[:, -1:].argmax(-1)
            times.append(dt * 1e3)
    return statistics.median(times[1:])


def snap_cache(model, args):
    return SnapKVCache(model, max_capacity_prompt=args.max_capacity_prompt, window_size=args.window_size,
                       kernel_size=args.kernel_size, pooling=args.pooling, decode_reserve=args.decode_steps + 8)


def bench_length(model, tok, L, args):
    dev = args.device
    ids = prompt_ids(tok, L, args.batch, model.config.vocab_size, dev)
    cfg = model.config
    res = dict(L=L, batch=args.batch, max_capacity_prompt=args.max_capacity_prompt)
    t_full, t_snap = [], []
    for _ in range(args.reps):  # interleaved: A B A B ...
        gc.collect()
        dt, _ = timed(lambda: prefill(model, ids, DynamicCache()), dev)
        t_full.append(dt)
        gc.collect()
        dt, _ = timed(lambda: prefill(model, ids, snap_cache(model, args)), dev)
        t_snap.append(dt)
    res["prefill_full_s"] = statistics.median(t_full)
    res["prefill_snap_s"] = statistics.median(t_snap)
    res["prefill_overhead"] = res["prefill_snap_s"] / res["prefill_full_s"] - 1

    full = DynamicCache()
    logits = prefill(model, ids, full)
    first = logits[:, -1:].argmax(-1)
    snap = snap_cache(model, args)
    prefill(model, ids, snap)
    phys = snap.stats()["physical_length"][0]
    same = DynamicCache()
    prefill(model, ids[:, -phys:], same)
    res["kv_bytes_full"] = cache_bytes(full)
    res["kv_bytes_snap"] = cache_bytes(snap)
    res["kv_bytes_budget_arithmetic"] = (cfg.num_hidden_layers * 2 * args.batch * cfg.num_key_value_heads
                                         * args.max_capacity_prompt * (cfg.hidden_size // cfg.num_attention_heads)
                                         * torch.finfo(getattr(torch, args.dtype)).bits // 8)
    res["physical_length"] = phys
    d_snap, d_same, d_full = [], [], []
    for _ in range(args.reps):  # interleaved again; each decodes from a fresh copy of its cache
        d_snap.append(decode_ms(model, _copy(snap), args.decode_steps, dev, first))
        d_same.append(decode_ms(model, _copy(same), args.decode_steps, dev, first))
        d_full.append(decode_ms(model, _copy(full), args.decode_steps, dev, first))
    res["decode_snap_ms"] = statistics.median(d_snap)
    res["decode_dynamic_same_physical_ms"] = statistics.median(d_same)
    res["decode_full_ms"] = statistics.median(d_full)
    res["decode_vs_same_physical"] = res["decode_snap_ms"] / res["decode_dynamic_same_physical_ms"]
    res["decode_speedup_vs_full"] = res["decode_full_ms"] / res["decode_snap_ms"]
    del full, snap, same
    gc.collect()
    return res


def _copy(cache):
    import copy

    return copy.deepcopy(cache)


def max_length_search(model, args):
    """Longest prompt (doubling, then bisecting in steps of 4K) whose prefill fits, per method."""
    out = {}
    for name, make in (("dynamic", lambda: DynamicCache()), ("snapkv", lambda: snap_cache(model, args))):
        lo, hi, L = 0, None, 8192
        while True:
            try:
                ids = prompt_ids(None, L, args.batch, model.config.vocab_size, args.device)
                c = make()
                prefill(model, ids, c)
                with torch.no_grad():
                    model(ids[:, -1:], **cache_kwargs(model, c))
                lo = L
                del c, ids
            except torch.OutOfMemoryError:
                hi = L
            gc.collect()
            torch.cuda.empty_cache()
            if hi is None:
                L *= 2
            elif hi - lo <= 4096:
                break
            else:
                L = (lo + hi) // 2 // 4096 * 4096 or lo + 4096
        out[name] = lo
        print(f"longest prompt that fits ({name}, batch {args.batch}): {lo} tokens", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", *RANDOM_SHAPES])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-capacity-prompt", type=int, default=1024)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--pooling", default="max")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=24)
    p.add_argument("--max-length-search", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tok = load_by_name(args.model, args.device, args.dtype)
    rows = []
    if args.max_length_search:
        rows.append(max_length_search(model, args))
    else:
        for L in args.lengths:
            r = bench_length(model, tok, L, args)
            rows.append(r)
            print(f"L={L:6d} prefill full {r['prefill_full_s']:.3f}s snap {r['prefill_snap_s']:.3f}s "
                  f"(overhead {100 * r['prefill_overhead']:+.1f}%) | decode ms: snap {r['decode_snap_ms']:.2f} "
                  f"dynamic@{r['physical_length']} {r['decode_dynamic_same_physical_ms']:.2f} "
                  f"(ratio {r['decode_vs_same_physical']:.3f}) full {r['decode_full_ms']:.2f} "
                  f"(speedup {r['decode_speedup_vs_full']:.2f}x) | KV MB full {r['kv_bytes_full'] / 2**20:.1f} "
                  f"snap {r['kv_bytes_snap'] / 2**20:.2f} (arithmetic {r['kv_bytes_budget_arithmetic'] / 2**20:.2f})",
                  flush=True)
    if args.json:
        meta = dict(model=args.model, device=args.device, dtype=args.dtype, torch=torch.__version__,
                    threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                    date=time.strftime("%Y-%m-%d"), argv=sys.argv)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
