"""Needle retrieval per selection policy and budget, and the sweep the defaults are chosen from.

    python benchmarks/bench_needle_policies.py --out benchmarks/results/needle_policies
    python benchmarks/bench_needle_policies.py --scorers all --kernel-size 13 --out benchmarks/results/needle_scorers

SmolLM2 (embedded), prompts of 1K-4K tokens, the pass key at 5 depths: the full cache, then every
policy at 25%, 10% and 5% of the prompt (window 16, the library's pooling defaults), then the sweep
at 10% and 5%: pooling kernel x {snapkv, adakv}, average pooling, max over a GQA group, AdaKV's
floor. Each prompt's document part is read once (``needle_eval(read_once=True)``: every SnapKV
setting then runs only the prompt's last 32 tokens against the stored KV, the same selection as
from scratch). Writes needle.json, one heatmap per method and table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from snapkv_ext.policies import POLICIES, AdaKV  # noqa: E402
from snapkv_ext.scorers import SCORERS  # noqa: E402
from snapkv_ext.tools.evaluate import Method, needle_eval, plot_needle  # noqa: E402
from snapkv_ext.tools.models import load_model  # noqa: E402


def methods(window: int, kernel: int, ratios, sweep_ratios, sweep: bool):
    out = [Method.full()]
    base = dict(window_size=window, kernel_size=kernel)
    for p in POLICIES:
        out += [Method(f"{p}-{r * 100:g}%", compression_ratio=r, policy=p, **base) for r in ratios]
    if not sweep:
        return out
    for r in sweep_ratios:
        pct = f"{r * 100:g}%"
        for p in ("snapkv", "adakv"):
            for k in (1, 3, 5, 7, 9, 13):
                out.append(Method(f"{p}-{pct}-k{k}", compression_ratio=r, policy=p, window_size=window, kernel_size=k))
            out.append(Method(f"{p}-{pct}-avg", compression_ratio=r, policy=p, pooling="avg", **base))
            out.append(Method(f"{p}-{pct}-gmax", compression_ratio=r, policy=p, group_reduce="max", **base))
        for f in (0.0, 0.1, 0.5):
            out.append(Method(f"adakv-{pct}-floor{f:g}", compression_ratio=r, policy=AdaKV(floor=f), **base))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 3000, 4000])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1, 0.05])
    p.add_argument("--sweep-ratios", type=float, nargs="+", default=[0.1, 0.05])
    p.add_argument("--window-size", type=int, default=16)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--kernels", type=int, nargs="*", default=None,
                   help="only these pooling kernels (snapkv and adakv): the sweep's extension")
    p.add_argument("--scorers", nargs="+", default=None, metavar="SCORER",
                   help=f"the scorer table instead: these scorers ({', '.join(SCORERS)} or all) x every policy x "
                        "--ratios, beside the full cache")
    p.add_argument("--out", default="needle-policies")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model, tok = load_model()
    if args.scorers:
        return scorer_table(model, tok, args)
    if args.kernels:
        ms = [Method.full()] + [
            Method(f"{p}-{r * 100:g}%-k{k}", compression_ratio=r, policy=p, window_size=args.window_size, kernel_size=k)
            for r in args.sweep_ratios for p in ("snapkv", "adakv") for k in args.kernels]
        res = needle_eval(model, tok, args.lengths, args.depths, ms, progress=True, read_once=True)
        res.update(date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv)
        with open(os.path.join(args.out, "needle.json"), "w") as f:
            json.dump(res, f, indent=1)
        n = res["cases"]
        first = f"{args.sweep_ratios[0] * 100:g}%"
        lines = ["| sweep | " + " | ".join(f"{r * 100:g}%" for r in args.sweep_ratios) + " |",
                 "|---|" + "---|" * len(args.sweep_ratios)]
        lines += ["| " + m.name.replace(f"-{first}", "") + " | " + " | ".join(
            f"{res['summary'][m.name.replace(first, f'{r * 100:g}%')]}/{n}" for r in args.sweep_ratios) + " |"
            for m in ms if first in m.name]
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    ms = methods(args.window_size, args.kernel_size, args.ratios, args.sweep_ratios, not args.no_sweep)
    res = evaluate_and_save(model, tok, args, ms)
    main_names = [m.name for m in ms[: 1 + len(POLICIES) * len(args.ratios)]]
    plot_needle(dict(res, retrieved={k: res["retrieved"][k] for k in main_names}), os.path.join(args.out, "needle"))
    n = res["cases"]
    lines = ["| policy | " + " | ".join(f"{r * 100:g}%" for r in args.ratios) + " |",
             "|---|" + "---|" * len(args.ratios)]
    lines.append(f"| full cache | {res['summary']['full']}/{n} |" + " |" * (len(args.ratios) - 1))
    for pol in POLICIES:
        lines.append(f"| {pol} | " + " | ".join(f"{res['summary'][f'{pol}-{r * 100:g}%']}/{n}" for r in args.ratios)
                     + " |")
    if not args.no_sweep:
        lines += ["", "| sweep | " + " | ".join(f"{r * 100:g}%" for r in args.sweep_ratios) + " |",
                  "|---|" + "---|" * len(args.sweep_ratios)]
        first = f"{args.sweep_ratios[0] * 100:g}%"
        for name in [m.name for m in ms if first in m.name and m.name.count("-") >= 2 and not m.name.endswith("%")]:
            row = [name.replace(f"-{first}", "")]
            for r in args.sweep_ratios:
                row.append(f"{res['summary'][name.replace(first, f'{r * 100:g}%')]}/{n}")
            lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\n{res['minutes']:.1f} min; load average {res['load'][0]:.2f} before, {res['load'][1]:.2f} after")


def evaluate_and_save(model, tok, args, ms):
    """needle_eval over ``ms`` (each prompt read once), with the run's date, machine, minutes and
    load average, written to <out>/needle.json; -> the result."""
    t0, load0 = time.time(), os.getloadavg()[0]
    res = needle_eval(model, tok, args.lengths, args.depths, ms, progress=True, read_once=True)
    res.update(date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv, torch=torch.__version__,
               machine=f"{platform.machine()}, {os.cpu_count()} CPUs", minutes=(time.time() - t0) / 60,
               load=[load0, os.getloadavg()[0]])
    with open(os.path.join(args.out, "needle.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def scorer_table(model, tok, args):
    """Every scorer x policy x ratio beside the full cache: needle.json, a heatmap per method, table.md."""
    names = list(SCORERS) if args.scorers == ["all"] else args.scorers
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise SystemExit(f"--scorers: unknown {unknown}; choose from {', '.join(SCORERS)} or all")
    base = dict(window_size=args.window_size, kernel_size=args.kernel_size)
    ms = [Method.full()] + [Method(f"{s}+{p}-{r * 100:g}%", compression_ratio=r, policy=p, scorer=s, **base)
                            for s in names for p in POLICIES for r in args.ratios]
    res = evaluate_and_save(model, tok, args, ms)
    plot_needle(res, os.path.join(args.out, "needle"))
    n = res["cases"]
    lines = ["| scorer | policy | " + " | ".join(f"{r * 100:g}%" for r in args.ratios) + " |",
             "|---|---|" + "---|" * len(args.ratios),
             f"| full cache | | {res['summary']['full']}/{n} |" + " |" * (len(args.ratios) - 1)]
    for s in names:
        for p in POLICIES:
            lines.append(f"| {s} | {p} | " + " | ".join(f"{res['summary'][f'{s}+{p}-{r * 100:g}%']}/{n}"
                                                       for r in args.ratios) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"\n{res['minutes']:.1f} min; load average {res['load'][0]:.2f} before, {res['load'][1]:.2f} after")


if __name__ == "__main__":
    main()
