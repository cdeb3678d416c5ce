"""Teacher-forced perplexity over a long text, compressing as it goes (issue 26's quality (a)).

    python benchmarks/bench_stream_ppl.py --tokens 8192 --budgets 1024 512 256 \\
        --scorers snapkv streamingllm keynorm tova vatp --json benchmarks/results/decode_budget/ppl.json

SmolLM2 (embedded) reads a long text that ships with Python itself (the reference manual's topics in
``pydoc_data.topics``, sorted by name: nothing is downloaded). The first ``--prompt`` tokens are one
forward; the rest arrive ``--block`` tokens at a time, each block scored (the negative
log-likelihood of every next token) against the cache so far, then appended. The full cache
(DynamicCache) against SnapKVCache with ``max_capacity_decode`` = each budget (the prompt
budget the same), re-selected every ``--interval`` tokens by each scorer. Reports the perplexity
over the tokens after the prompt, and the entries held per KV head at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_json  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from snapkv_ext import SnapKVCache  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from snapkv_ext.tools.evaluate import held_per_head  # noqa: E402
from snapkv_ext.tools.models import load_model  # noqa: E402


def text_ids(tok, n: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] < n:
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than --tokens {n}")
    return ids[:, :n]


def stream_nll(model, ids: torch.Tensor, cache, prompt: int, block: int):
    """Sum of -log p(next token) over positions prompt..L-1, and their count."""
    nll, count = 0.0, 0
    with torch.no_grad():
        logits = model(ids[:, :prompt], use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:]
        for s in range(prompt, ids.shape[1], block):
            e = min(ids.shape[1], s + block)
            chunk = ids[:, s:e]
            # the token at s is predicted by the previous forward's last logits, s+1.. by this block's
            out = model(chunk, position_ids=torch.arange(s, e)[None], use_cache=True, **cache_kwargs(model, cache)).logits
            pred = torch.cat([logits, out[:, :-1]], dim=1).float().log_softmax(-1)
            nll -= float(pred.gather(-1, chunk[..., None]).sum())
            count += chunk.shape[1]
            logits = out[:, -1:]
    return nll, count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 512, 256])
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--scorers", nargs="+", default=["snapkv", "streamingllm", "keynorm", "tova", "vatp"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tok = load_model()
    ids = text_ids(tok, args.tokens)
    out = dict(model="smollm2", tokens=args.tokens, prompt=args.prompt, block=args.block, interval=args.interval,
               window_size=args.window_size, text="pydoc_data.topics (sorted)", date=time.strftime("%Y-%m-%d %H:%M"),
               argv=sys.argv, torch=torch.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs", rows=[])
    settings = [("full", None, None)] + [(s, b, s) for b in args.budgets for s in args.scorers]
    for name, budget, scorer in settings:
        cache = DynamicCache(config=model.config) if budget is None else SnapKVCache(
            model, max_capacity_prompt=budget, window_size=args.window_size, max_capacity_decode=budget,
            decode_interval=args.interval, scorer=scorer)
        t0 = time.perf_counter()
        nll, n = stream_nll(model, ids, cache, args.prompt, args.block)
        held = held_per_head(cache) if budget is not None else ids.shape[1]
        row = dict(scorer=name if budget is not None else "full", budget=budget, ppl=math.exp(nll / n), tokens=n,
                   held_per_head_end=held, seconds=time.perf_counter() - t0)
        out["rows"].append(row)
        print(f"{row['scorer']:12s} budget {str(budget):>5s}: ppl {row['ppl']:.3f} over {n} tokens, held {held} per "
              f"KV head at the end ({row['seconds']:.0f} s)", flush=True)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
