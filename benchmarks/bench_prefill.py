"""Layer-major chunked prefill (snapkv_ext.prefill) against one-shot prefill: peak memory against
the formula, time per prompt token, and the same selection.

    python benchmarks/bench_prefill.py --model smollm2 --lengths 8192 32768 --chunk-size 4096
    python benchmarks/bench_prefill.py --model llama2-7b --device cuda --dtype bfloat16 --max-length-search

Each (length, mode) runs in a fresh process, so that one run's peak does not hide another's:
- CPU: the peak resident set during the prefill alone (VmHWM, reset with /proc/self/clear_refs
  after the model is loaded and glibc has returned its freed heap with malloc_trim, so that the
  prefill cannot reuse memory the resident set already counts), beside the resident set before it;
- CUDA: torch.cuda.max_memory_allocated over the prefill, beside what was allocated before.
``formula`` is the resident/allocated memory before the prefill plus
``snapkv_ext.prefill.prefill_memory(...)["total"]`` (hidden states, one layer's full KV, the
compressed cache, one chunk's activations). ``one-shot`` is ``model(ids, cache=SnapKVCache)``,
what ``generate`` does. Both modes report a digest of every layer's kept positions: equal digests
mean the same selection. ``--max-length-search`` doubles the prompt (layer-major, then one-shot)
until the formula or the device refuses it, on a random-weight real shape.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_json  # noqa: E402
from snapkv_ext import SnapKVCache  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from snapkv_ext.prefill import prefill, prefill_memory  # noqa: E402
from snapkv_ext.tools.models import RANDOM_SHAPES, load_by_name, random_model  # noqa: E402


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak(device: str) -> int:
    """Reset the peak counter; -> bytes in use now."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import ctypes
    import gc

    gc.collect()
    try:  # hand freed heap memory back to the OS first: else the prefill reuses it unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    return _status("VmRSS")


def _peak(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def _digest(cache: SnapKVCache) -> str:
    h = hashlib.sha1()
    for i in range(len(cache.layers)):
        pos = cache.kept_positions(i)
        h.update(pos.sort(-1).values.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def worker(args) -> dict:
    if args.layers and args.model in RANDOM_SHAPES:
        model = random_model(args.model, args.device, getattr(torch, args.dtype), layers=args.layers)
    else:
        model, _ = load_by_name(args.model, args.device, args.dtype)
        if args.layers:  # keep the first layers of a loaded model (a Llama: model.model.layers)
            model.model.layers = torch.nn.ModuleList(list(model.model.layers)[: args.layers])
            model.config.num_hidden_layers = args.layers
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.length)
    ids = torch.randint(10, vocab, (args.batch, args.length), generator=g).to(args.device)
    cache = SnapKVCache(model, max_capacity_prompt=args.max_capacity_prompt, window_size=args.window_size)
    parts = prefill_memory(model, cache, args.batch, args.length, args.chunk_size)
    before = _reset_peak(args.device)
    t = time.perf_counter()
    if args.mode == "layer-major":
        logits = prefill(model, ids, cache, chunk_size=args.chunk_size, allow_longer=True)
    else:
        with torch.no_grad():
            logits = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = _peak(args.device)
    return dict(mode=args.mode, length=args.length, batch=args.batch, chunk_size=args.chunk_size,
                seconds=seconds, ms_per_token=1000 * seconds / (args.length * args.batch),
                before_bytes=before, peak_bytes=peak, prefill_peak_bytes=peak - before,
                formula_parts=parts, formula_bytes=before + parts["total"],
                peak_over_formula=peak / (before + parts["total"]),
                selection_digest=_digest(cache), next_token=logits.argmax(-1).tolist())


def run_one(args, mode: str, length: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--length", str(length),
           "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch),
           "--chunk-size", str(args.chunk_size), "--max-capacity-prompt", str(args.max_capacity_prompt),
           "--window-size", str(args.window_size)] + (["--layers", str(args.layers)] if args.layers else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return dict(mode=mode, length=length, error=tail)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _gib(n) -> str:
    return f"{n / 2**30:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--modes", nargs="+", default=["layer-major", "one-shot"], choices=["layer-major", "one-shot"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=4096)
    p.add_argument("--max-capacity-prompt", type=int, default=1024)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the model's first N layers: the prefill's per-layer memory (hidden states, "
                        "one layer's KV, one chunk) and time per layer are the whole model's, the weights and the "
                        "compressed cache scale with N, and a long run fits in minutes")
    p.add_argument("--max-length-search", action="store_true",
                   help="double the prompt from the first --lengths value until a mode no longer fits")
    p.add_argument("--max-length", type=int, default=None, help="with --max-length-search: the longest to try")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="layer-major", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    load = os.getloadavg()[0]
    if args.max_length_search:
        for mode in args.modes:
            n = args.lengths[0]
            while True:
                r = run_one(args, mode, n)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "formula_parts"}), flush=True)
                if "error" in r or (args.max_length and 2 * n > args.max_length):
                    break
                n *= 2
    else:
        for n in args.lengths:
            for mode in args.modes:
                r = run_one(args, mode, n)
                rows.append(r)
                if "error" in r:
                    print(f"L={n:7d} {mode:11s} ERROR {r['error']}", flush=True)
                    continue
                f = r["formula_parts"]
                print(f"L={n:7d} {mode:11s} {r['seconds']:8.1f} s ({r['ms_per_token']:.3f} ms/token)  peak "
                      f"{_gib(r['peak_bytes'])} GiB (before {_gib(r['before_bytes'])}, prefill +"
                      f"{_gib(r['prefill_peak_bytes'])})  formula {_gib(r['formula_bytes'])} GiB "
                      f"(hidden {_gib(f['hidden'])}, layer KV {_gib(f['layer_kv'])}, cache {_gib(f['cache'])}, "
                      f"chunk {_gib(f['chunk'])}, attention {_gib(f['attention'])}) -> peak/formula {r['peak_over_formula']:.3f}  "
                      f"selection {r['selection_digest']}", flush=True)
    summary = []
    for n in sorted({r["length"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["length"] == n and "error" not in r}
        if len(by) == 2:
            lm, os_ = by["layer-major"], by["one-shot"]
            s = dict(length=n, peak_ratio=lm["peak_bytes"] / os_["peak_bytes"],
                     prefill_peak_ratio=lm["prefill_peak_bytes"] / max(1, os_["prefill_peak_bytes"]),
                     time_ratio=lm["seconds"] / os_["seconds"],
                     same_selection=lm["selection_digest"] == os_["selection_digest"],
                     same_next_token=lm["next_token"] == os_["next_token"])
            summary.append(s)
            print(f"L={n:7d} layer-major / one-shot: peak {s['peak_ratio']:.3f}x (prefill's own "
                  f"{s['prefill_peak_ratio']:.3f}x), time {s['time_ratio']:.3f}x, same selection "
                  f"{s['same_selection']}, same next token {s['same_next_token']}")
    load_after = os.getloadavg()[0]
    if max(load, load_after) > (os.cpu_count() or 1):
        print(f"note: the machine was busy (load {load:.1f} -> {load_after:.1f} on {os.cpu_count()} cores): "
              "times are disturbed")
    out = dict(model=args.model, layers=args.layers, device=args.device, dtype=args.dtype, batch=args.batch, chunk_size=args.chunk_size,
               max_capacity_prompt=args.max_capacity_prompt, window_size=args.window_size, rows=rows,
               summary=summary, torch=torch.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
               load_before=load, load_after=load_after, date=time.strftime("%Y-%m-%d %H:%M"))
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
