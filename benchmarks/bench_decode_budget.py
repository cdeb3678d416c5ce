"""Compression during generation: held KV, memory and the decode step over a long generation.

    python benchmarks/bench_decode_budget.py --new-tokens 16384 --budgets 1024 512 \\
        --json benchmarks/results/decode_budget/smollm2_16k.json

SmolLM2 (embedded), a haystack prompt, greedy generation of --new-tokens tokens (end of text
ignored), once per setting: the full cache (DynamicCache), then SnapKVCache with each decode budget
(``max_capacity_decode``, re-selected every ``--interval`` tokens). Every ``--every`` tokens: the
entries the most loaded layer holds per KV head, the KV bytes held, the process's resident memory
and the time. Then the cost (``--cost-only``: only that): the decode step of each budget over
``--cost-tokens`` steps of whole re-selection periods (interval + 1 steps, one re-selection each),
against DynamicCache and SnapKVCache without a decode budget started so that their mean held
length over the same steps is the same; the three alternate in one process, ``--reps`` rounds,
medians. Plots held KV against generated tokens (held_kv.png).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_json  # noqa: E402
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

from snapkv_ext import SnapKVCache  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from snapkv_ext.layers import SnapKVLayer  # noqa: E402
from snapkv_ext.tools.haystack import haystack  # noqa: E402
from snapkv_ext.tools.models import load_model  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def kv_bytes(cache) -> int:
    if isinstance(cache, SnapKVCache):
        return cache.stats()["kv_bytes"]
    return sum(2 * lay.keys.numel() * lay.keys.element_size() for lay in cache.layers if lay.keys is not None)


def held_per_head(cache) -> int:
    if isinstance(cache, SnapKVCache):
        return max(lay.held_per_head() for lay in cache.layers if isinstance(lay, SnapKVLayer))
    return max(lay.keys.shape[2] for lay in cache.layers if lay.keys is not None)


class Probe(LogitsProcessor):
    """Called once per generated token: samples held entries, KV bytes, RSS and time every `every`."""

    def __init__(self, cache, every: int):
        self.cache, self.every, self.n, self.rows = cache, every, 0, []
        self.t0 = time.perf_counter()
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if self.n % self.every == 0:
            self.rows.append(dict(generated=self.n, held=held_per_head(self.cache), kv_bytes=kv_bytes(self.cache),
                                  rss=rss_bytes(), seconds=self.times[-1] - self.t0))
        self.n += 1
        return scores


def run(model, ids, cache, n: int, every: int):
    probe = Probe(cache, every)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, logits_processor=LogitsProcessorList([probe]), **cache_kwargs(model, cache))
    steps = [b - a for a, b in zip(probe.times, probe.times[1:])]
    return probe.rows, steps


def window_ms(model, ids, cache, start: int, steps: int):
    """Greedy generation with ``cache``; the decode steps ``start`` .. ``start + steps`` (those after
    the prefill only): (mean ms per step, mean entries held per KV head in the most loaded layer,
    re-selections of the layers in that window)."""
    probe = Probe(cache, 10 ** 9)
    marks = {}

    class Window(LogitsProcessor):
        def __call__(self, input_ids, scores):
            i = len(probe.times)  # 1 after the prefill's logits, i + 1 after decode step i
            if i - 1 in (start, start + steps) and isinstance(cache, SnapKVCache):
                marks[i - 1] = sum(c for c in cache.stats()["compressions"])
            if start <= i - 1 < start + steps:
                marks.setdefault("held", []).append(held_per_head(cache))
            return scores

    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=start + steps + 2,
                       min_new_tokens=start + steps + 2, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([Window(), probe]), **cache_kwargs(model, cache))
    t = probe.times[start + 1: start + steps + 2]  # t[j + 1] - t[j]: decode step start + j
    ms = 1000 * (t[-1] - t[0]) / steps
    held = statistics.mean(marks["held"])
    reselections = marks.get(start + steps, 0) - marks.get(start, 0)
    return ms, held, reselections


def cost(model, ids, budget: int, interval: int, steps: int, reps: int) -> dict:
    """The decode step with a decode budget, amortised over whole re-selection periods, against
    DynamicCache and SnapKVCache without a decode budget at the same mean held length, the three
    alternating in one process (``reps`` rounds; medians)."""
    warm = interval + 1  # from the first re-selection on: the periodic regime
    period = interval + 1
    steps = max(period, steps // period * period)  # whole periods: each holds one re-selection
    mean_held = budget + interval / 2
    # DynamicCache and the uncompressed-while-decoding SnapKVCache grow by one per step: start them
    # so that their mean over the same window equals the budget's mean.
    start_len = int(round(mean_held - steps / 2))
    ref_ids = torch.cat([ids] * (start_len // ids.shape[1] + 1), 1)[:, :start_len]
    make = {
        "decode budget": lambda: (ids, SnapKVCache(model, max_capacity_prompt=budget, max_capacity_decode=budget,
                                                   decode_interval=interval)),
        "DynamicCache": lambda: (ref_ids, DynamicCache(config=model.config)),
        "SnapKVCache, no decode budget": lambda: (ids, SnapKVCache(model, max_capacity_prompt=start_len)),
    }
    runs = {name: [] for name in make}
    for _ in range(reps):
        for name, fn in make.items():
            prompt, cache = fn()
            start = warm if name == "decode budget" else 0
            runs[name].append(window_ms(model, prompt, cache, start, steps))
    rec = dict(budget=budget, interval=interval, steps=steps, reps=reps)
    for name, rs in runs.items():
        rec[name] = dict(ms=statistics.median(r[0] for r in rs), all_ms=[r[0] for r in rs],
                         mean_held=statistics.mean(r[1] for r in rs), reselections=rs[0][2])
    base = rec["DynamicCache"]["ms"]
    rec["ratio"] = rec["decode budget"]["ms"] / base
    rec["ratio_no_budget"] = rec["SnapKVCache, no decode budget"]["ms"] / base
    rec["per_round_ratio"] = [a[0] / b[0] for a, b in zip(runs["decode budget"], runs["DynamicCache"])]
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=16384)
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 512])
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--max-capacity-prompt", type=int, default=1024)
    p.add_argument("--every", type=int, default=256)
    p.add_argument("--no-full", action="store_true", help="skip the full-cache run")
    p.add_argument("--cost-only", action="store_true", help="only the cost comparison, not the long runs")
    p.add_argument("--cost-tokens", type=int, default=260, help="decode steps timed per cost run (whole periods)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tok = load_model()
    text = " ".join(haystack(args.prompt_tokens // 12))
    ids = tok(text, return_tensors="pt").input_ids[:, : args.prompt_tokens]
    cfg = model.config
    per_entry = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    out = dict(model="smollm2", prompt_tokens=ids.shape[1], new_tokens=args.new_tokens, interval=args.interval,
               max_capacity_prompt=args.max_capacity_prompt, date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv,
               torch=torch.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
               threads=torch.get_num_threads(), runs=[], cost=[])
    settings = ([] if args.no_full else [("full", None)]) + [(f"decode-{b}", b) for b in args.budgets]
    if args.cost_only:
        settings = []
    for name, budget in settings:
        cache = DynamicCache(config=model.config) if budget is None else SnapKVCache(
            model, max_capacity_prompt=args.max_capacity_prompt, max_capacity_decode=budget,
            decode_interval=args.interval)
        load0 = os.getloadavg()[0]
        rows, steps = run(model, ids, cache, args.new_tokens, args.every)
        half = steps[len(steps) // 2:]
        rec = dict(name=name, budget=budget, rows=rows, load=[load0, os.getloadavg()[0]],
                   mean_step_ms_second_half=1000 * sum(half) / len(half),
                   formula_kv_bytes=None if budget is None else (budget + args.interval) * per_entry)
        if budget is not None:
            held = [r["held"] for r in rows[1:]]
            rec.update(max_held=max(held), kv_peak=max(r["kv_bytes"] for r in rows[1:]),
                       rss_first=rows[1]["rss"], rss_last=rows[-1]["rss"], rss_max=max(r["rss"] for r in rows[1:]))
        out["runs"].append(rec)
        last = rows[-1]
        print(f"{name:12s} {args.new_tokens} tokens: held {last['held']} per head at the end "
              f"(max {rec.get('max_held', last['held'])}), KV {last['kv_bytes'] / 2**20:.1f} MB, RSS "
              f"{last['rss'] / 2**30:.2f} GiB, {rec['mean_step_ms_second_half']:.1f} ms/token (second half)", flush=True)
    # the cost: the amortised step against DynamicCache at the same mean held length, alternating
    for budget in args.budgets:
        rec = cost(model, ids, budget, args.interval, args.cost_tokens, args.reps)
        out["cost"].append(rec)
        for name in ("decode budget", "SnapKVCache, no decode budget", "DynamicCache"):
            r = rec[name]
            print(f"cost, budget {budget}: {name:30s} {r['ms']:7.2f} ms/step (mean held {r['mean_held']:.0f}, "
                  f"re-selections {r['reselections']})", flush=True)
        print(f"cost, budget {budget}: decode budget / DynamicCache = {rec['ratio']:.3f}x "
              f"(rounds: {', '.join(f'{x:.3f}' for x in rec['per_round_ratio'])}); without a decode budget "
              f"{rec['ratio_no_budget']:.3f}x", flush=True)
    if args.json:
        write_json(args.json, out)
    if args.json and out["runs"]:  # --cost-only: nothing to plot
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(7, 4))
            for rec in out["runs"]:
                ax.plot([r["generated"] for r in rec["rows"]], [r["kv_bytes"] / 2**20 for r in rec["rows"]],
                        label=rec["name"])
            ax.set_xlabel("generated tokens")
            ax.set_ylabel("KV held (MiB)")
            ax.set_title(f"SmolLM2, {ids.shape[1]}-token prompt, greedy")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(os.path.dirname(os.path.abspath(args.json)), "held_kv.png"), dpi=110)
        except ImportError:
            pass


if __name__ == "__main__":
    main()
