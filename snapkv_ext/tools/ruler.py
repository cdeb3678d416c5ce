"""RULER through lm-eval (the optional extra): the offline synthetic tasks at each length, the full
cache beside each SnapKV setting, with progress, a JSON and a plot. Behind ``snapkv-ext eval ruler``.

RULER's synthetic tasks build their data locally from the model's tokenizer (500 samples per task
and length; ``limit`` runs the first ones). The others need downloads: the Paul Graham essays
haystack (``niah_single_2``, ``niah_single_3``, ``niah_multikey_1``, ``niah_multivalue``,
``niah_multiquery``) and SQuAD / HotpotQA (``ruler_qa_squad``, ``ruler_qa_hotpot``).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import DEFAULT_KERNEL_SIZE, SnapKVConfig

# The RULER tasks that build their data with no download (lm-eval 0.4.13).
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
DOWNLOAD_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery",
                  "ruler_qa_squad", "ruler_qa_hotpot")
# ruler_vt's generator never finishes below ~1K tokens (its in-context example alone is ~500).
MIN_LENGTH = 1024

Setting = Tuple[str, Optional[SnapKVConfig]]


def settings_from(max_capacity_prompts: Sequence[int] = (), compression_ratios: Sequence[float] = (),
                  window_size: int = 32, kernel_size: int = DEFAULT_KERNEL_SIZE, pooling: str = "max",
                  policies: Sequence[str] = ("snapkv",), scorers: Sequence[str] = ("snapkv",),
                  max_capacity_decodes: Sequence[Optional[int]] = (None,)) -> List[Setting]:
    """``[("full", None), ("snapkv-50%", SnapKVConfig(...)), ("adakv-50%", ...), ...]``: the full
    cache first, then per scorer, policy and decode budget each budget (another scorer than
    SnapKV's named first: ``tova+snapkv-50%``; a decode budget last: ``snapkv-50%+decode-512``)."""
    out: List[Setting] = [("full", None)]
    for s in scorers:
        for p in policies:
            for d in max_capacity_decodes:
                kw = dict(window_size=window_size, kernel_size=kernel_size, pooling=pooling, policy=p, scorer=s,
                          max_capacity_decode=d)
                name = p if s == "snapkv" else f"{s}+{p}"
                tail = "" if d is None else f"+decode-{d}"
                out += [(f"{name}-{c}{tail}", SnapKVConfig(max_capacity_prompt=c, **kw)) for c in max_capacity_prompts]
                out += [(f"{name}-{r * 100:g}%{tail}", SnapKVConfig(compression_ratio=r, **kw))
                        for r in compression_ratios]
    return out


def _no_punkt_download() -> None:
    """lm-eval's RULER module downloads NLTK's punkt_tab when imported; only the essay tasks
    (never run here) split sentences with it. Give this process an empty stand-in instead."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
        return
    except LookupError:
        pass
    from .models import cache_root

    root = os.path.join(cache_root(), "nltk_stub")
    os.makedirs(os.path.join(root, "tokenizers", "punkt_tab"), exist_ok=True)
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)


def task_manager(tokenizer_dir: str, length: int):
    """A TaskManager over lm-eval's RULER folder only, building data for ``length`` tokens."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = os.path.join(os.path.dirname(lm_eval.tasks.__file__), "ruler")
    return TaskManager(include_path=folder, include_defaults=False,
                       metadata={"tokenizer": tokenizer_dir, "max_seq_lengths": [int(length)]})


def _prompt_tokens(lm, sample) -> int:
    """Tokens of the prompt lm-eval sent for one logged sample."""
    args = sample.get("arguments")
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": gen_kwargs}}
        args = [list(a.values()) for a in args.values()]
    try:
        return len(lm.tok_encode(args[0][0]))
    except (TypeError, IndexError, KeyError):
        return 0


def ruler_eval(lm, tasks: Sequence[str], lengths: Sequence[int], settings: Sequence[Setting], limit: Optional[int],
               seed: int = 0, apply_chat_template: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> Dict:
    """Every task at every length with every setting on ``lm`` (a :class:`snapkv_ext.lm_eval.SnapKVLM`):
    the data is built once per length, the model loaded once. Returns a JSON-able dict; scores
    are RULER's (fraction of the expected strings found in the answer, 0..1), averaged over samples."""
    import numpy as np
    from lm_eval.evaluator import evaluate

    _no_punkt_download()
    if lm.tokenizer_dir is None:
        raise ValueError("RULER needs the model's tokenizer in a folder (pass tokenizer=<folder>)")
    scores = {name: {t: {} for t in tasks} for name, _ in settings}
    kv_kept = {name: {} for name, _ in settings}
    wall = {name: {} for name, _ in settings}
    samples_per_task: Dict[str, Dict[int, int]] = {t: {} for t in tasks}
    prompt_tokens: Dict[str, Dict[int, float]] = {t: {} for t in tasks}
    records = []
    bar = None
    t_start = time.perf_counter()
    data_s = {}
    for length in lengths:
        t0 = time.perf_counter()
        log(f"RULER {length} tokens: building the data of {', '.join(tasks)} (500 samples each, once)")
        random.seed(seed)
        np.random.seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):  # RULER's generators print their search
            loaded = task_manager(lm.tokenizer_dir, length).load(list(tasks))
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        data_s[length] = time.perf_counter() - t0
        n_docs = {t: min(len(loaded["tasks"][t].eval_docs), limit or 10**9) for t in tasks}
        if progress and bar is None:
            from tqdm.auto import tqdm

            total = sum(n_docs.values()) * len(settings) * len(lengths)
            bar = tqdm(total=total, desc="ruler", unit="sample", dynamic_ncols=True)
            lm.show_progress = False
        for name, config in settings:
            lm.set_cache(config)
            lm.cache_log.clear()
            if bar is not None:
                bar.set_description(f"ruler {length} {name}")
                lm.on_batch = bar.update
            torch.manual_seed(seed)
            t1 = time.perf_counter()
            res = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True,
                           apply_chat_template=apply_chat_template, verbosity="WARNING")
            wall[name][length] = time.perf_counter() - t1
            lm.on_batch = None
            for t in tasks:
                scores[name][t][length] = float(res["results"][t][f"{length},none"])
                samples = res["samples"][t]
                samples_per_task[t][length] = len(samples)
                prompt_tokens[t][length] = float(np.mean([_prompt_tokens(lm, s) for s in samples])) if samples else 0.0
                for s in samples:
                    resp = s["filtered_resps"][0] if s.get("filtered_resps") else s["resps"][0]
                    resp = resp[0] if isinstance(resp, list) else resp
                    records.append(dict(setting=name, length=length, task=t, doc=s["doc_id"],
                                        target=s["target"], response=str(resp)[:300],
                                        score=float(s.get(str(length), -1))))
            log_ = lm.cache_log
            kv_kept[name][length] = (sum(r["kv_bytes"] for r in log_) / sum(r["full_kv_bytes"] for r in log_)
                                     if log_ and sum(r["full_kv_bytes"] for r in log_) else 1.0)
            mean = sum(scores[name][t][length] for t in tasks) / len(tasks)
            msg = (f"  {name:<12} {length}: " + "  ".join(f"{t} {100 * scores[name][t][length]:.0f}" for t in tasks)
                   + f"  | mean {100 * mean:.1f}, KV kept {100 * kv_kept[name][length]:.0f}%, "
                     f"{wall[name][length]:.0f} s")
            if bar is not None:
                bar.write(msg)
            else:
                log(msg)
    if bar is not None:
        bar.close()
        lm.show_progress = True
    return dict(
        tasks=list(tasks), lengths=[int(n) for n in lengths], limit=limit,
        settings={name: (c.to_dict() if c is not None else None) for name, c in settings},
        scores=scores, mean={name: {n: sum(scores[name][t][n] for t in tasks) / len(tasks) for n in lengths}
                             for name, _ in settings},
        kv_kept=kv_kept, samples=samples_per_task, prompt_tokens=prompt_tokens, wall_s=wall, data_s=data_s,
        total_s=time.perf_counter() - t_start, apply_chat_template=bool(apply_chat_template), records=records)


def table(res: Dict) -> str:
    """Markdown: one row per task (and the mean), one column per setting, per length; scores in %."""
    names = list(res["settings"])
    lines = []
    for n in res["lengths"]:
        head = f"| {n} tokens | " + " | ".join(names) + " |"
        lines += [head, "|---|" + "---|" * len(names)]
        for t in res["tasks"]:
            lines.append(f"| {t} | " + " | ".join(f"{100 * res['scores'][s][t][n]:.1f}" for s in names) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{100 * res['mean'][s][n]:.1f}**" for s in names) + " |")
        lines.append("| KV kept | " + " | ".join(f"{100 * res['kv_kept'][s][n]:.0f}%" for s in names) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_ruler(res: Dict, path: str) -> str:
    """One panel per length: score per task (and the mean), one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, tasks = res["lengths"], res["tasks"]
    cols = tasks + ["mean"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.2 + 1.1 * len(cols) * len(lengths), 4.2), dpi=100,
                             squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for name in res["settings"]:
            ys = [100 * res["scores"][name][t][n] for t in tasks] + [100 * res["mean"][name][n]]
            if name == "full":  # drawn on top, open markers: settings that match it stay visible
                ax.plot(range(len(cols)), ys, marker="o", markersize=10, markerfacecolor="none", color="black",
                        linestyle="--", linewidth=1.5, label=name, zorder=5)
            else:
                ax.plot(range(len(cols)), ys, marker="o", label=name)
        ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
        ax.set_ylim(-3, 103)
        ax.set_ylabel("score (%)")
        samples = sorted({res["samples"][t][n] for t in tasks})
        ax.set_title(f"RULER {n} tokens ({'/'.join(map(str, samples))} samples per task)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
