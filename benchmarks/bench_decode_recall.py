"""A fact from the prompt, recalled after the model has written thousands of tokens of its own
(issue 26's quality (b)).

    python benchmarks/bench_decode_recall.py --new-tokens 3072 --budgets 1024 512 256 \\
        --json benchmarks/results/decode_budget/recall.json

SmolLM2 (embedded). Each case: a haystack of about ``--prompt-tokens`` tokens with a pass key at a
depth, and a request for a long essay. The model writes ``--new-tokens`` tokens once, with the full
cache (sampled, seeded, end of text suppressed; all cases in one left-padded batch). Every setting
then reads the same prompt and the same written tokens (teacher-forced, ``--block`` tokens per
forward, compressing as it goes), and the user asks for the pass key; the answer is greedy.
Settings: the full cache (DynamicCache), SnapKV on the prompt only, and SnapKVCache with a decode
budget (the prompt budget the same) per scorer and budget.
"""
from __future__ import annotations

import argparse
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
from snapkv_ext.tools.haystack import chat_ids, haystack, retrieved  # noqa: E402
from snapkv_ext.tools.models import load_model  # noqa: E402

REQUEST = "Now write a long, detailed essay about the history of computing, from the abacus to today."
# The essay's turn ends, the user asks (SmolLM2's chat format, the tokens its template writes).
QUESTION = ("<|im_end|>\n<|im_start|>user\nWhat is the pass key in the document above? Answer with the number."
            "<|im_end|>\n<|im_start|>assistant\n")


def case_prompt(tok, n_tokens: int, depth: float, seed: int):
    """(prompt ids [1, L], pass key): filler with the key at ``depth``, then the essay request."""
    import random

    rng = random.Random(seed * 1000 + int(depth * 100))
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    sentences = haystack(max(1, n_tokens // 12), seed=seed)
    at = int(len(sentences) * depth)
    doc = " ".join(sentences[:at] + [needle] + sentences[at:])
    return chat_ids(tok, f"{doc}\n\n{REQUEST}"), key


def write(model, tok, prompts, n: int, seed: int):
    """The model's own continuation of every prompt (one left-padded batch, full cache)."""
    L = max(p.shape[1] for p in prompts)
    pad = tok.pad_token_id
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - p.shape[1]:] = p[0]
        mask[i, L - p.shape[1]:] = 1
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                             temperature=0.7, top_p=0.9, pad_token_id=pad)
    return [out[i:i + 1, L:] for i in range(len(prompts))]


def read_and_ask(model, tok, prompt, written, cache, block: int, answer_tokens: int):
    """Prompt, then the written tokens ``block`` at a time, then the question; the greedy answer."""
    suffix = tok(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        model(prompt, use_cache=True, **cache_kwargs(model, cache))
        pos = prompt.shape[1]
        rest = torch.cat([written, suffix], dim=1)
        for s in range(0, rest.shape[1], block):
            chunk = rest[:, s:s + block]
            logits = model(chunk, position_ids=torch.arange(pos, pos + chunk.shape[1])[None], use_cache=True,
                           **cache_kwargs(model, cache)).logits[:, -1]
            pos += chunk.shape[1]
        answer = []
        for _ in range(answer_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            answer.append(int(nxt))
            if answer[-1] == tok.eos_token_id:
                break
            logits = model(nxt, position_ids=torch.tensor([[pos]]), use_cache=True,
                           **cache_kwargs(model, cache)).logits[:, -1]
            pos += 1
    return tok.decode(answer, skip_special_tokens=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=3072)
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 512, 256])
    p.add_argument("--scorers", nargs="+", default=["snapkv"])
    p.add_argument("--other-scorers-budget", type=int, default=512,
                   help="the budget the scorers after the first are measured at")
    p.add_argument("--other-scorers", nargs="*", default=["streamingllm", "tova"])
    p.add_argument("--prompt-budget", type=int, default=None,
                   help="the decode settings' prompt budget (default: the decode budget; above the prompt's "
                        "length: the prompt is kept whole and only the re-selections while writing drop entries)")
    p.add_argument("--no-prompt-only", action="store_true", help="skip the SnapKV-on-the-prompt-only setting")
    p.add_argument("--interval", type=int, default=64)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tok = load_model()
    cases = [(d, s) + case_prompt(tok, args.prompt_tokens, d, s) for s in args.seeds for d in args.depths]
    t0 = time.perf_counter()
    written = write(model, tok, [c[2] for c in cases], args.new_tokens, seed=0)
    print(f"wrote {args.new_tokens} tokens for {len(cases)} cases ({time.perf_counter() - t0:.0f} s); the first "
          f"begins: {tok.decode(written[0][0, :40])!r}", flush=True)
    settings = [("full", None, None, None)]
    if not args.no_prompt_only:
        settings.append(("snapkv prompt only", "snapkv", args.budgets[-1], None))
    settings += [(f"{sc} decode {b}", sc, args.prompt_budget or b, b) for sc in args.scorers for b in args.budgets]
    settings += [(f"{sc} decode {args.other_scorers_budget}", sc, args.prompt_budget or args.other_scorers_budget,
                  args.other_scorers_budget) for sc in args.other_scorers]
    out = dict(model="smollm2", prompt_tokens=[c[2].shape[1] for c in cases], new_tokens=args.new_tokens,
               interval=args.interval, window_size=args.window_size, block=args.block,
               cases=[dict(depth=c[0], seed=c[1], key=c[3]) for c in cases], date=time.strftime("%Y-%m-%d %H:%M"),
               argv=sys.argv, torch=torch.__version__, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
               rows=[])
    for name, scorer, prompt_budget, decode_budget in settings:
        t0 = time.perf_counter()
        answers, held = [], []
        for (depth, seed, prompt, key), own in zip(cases, written):
            if scorer is None:
                cache = DynamicCache(config=model.config)
            else:
                cache = SnapKVCache(model, max_capacity_prompt=prompt_budget, window_size=args.window_size,
                                    max_capacity_decode=decode_budget, decode_interval=args.interval, scorer=scorer)
            a = read_and_ask(model, tok, prompt, own, cache, args.block, args.answer_tokens)
            answers.append(dict(depth=depth, seed=seed, key=key, answer=a, retrieved=retrieved(a, key)))
            held.append(held_per_head(cache) if scorer is not None else cache.get_seq_length())
        row = dict(setting=name, scorer=scorer, max_capacity_prompt=prompt_budget, max_capacity_decode=decode_budget,
                   retrieved=sum(a["retrieved"] for a in answers), cases=len(answers), answers=answers,
                   held_per_head_end=max(held), seconds=time.perf_counter() - t0)
        out["rows"].append(row)
        print(f"{name:24s} retrieved {row['retrieved']}/{row['cases']}, held at most {row['held_per_head_end']} per "
              f"KV head at the end ({row['seconds']:.0f} s); answers: "
              f"{[a['answer'][:24] for a in answers]}", flush=True)
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
