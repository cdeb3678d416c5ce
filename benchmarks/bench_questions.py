"""Many questions on one document: SnapKVDocument against re-reading document + question with
SnapKVCache, and against the question-agnostic way (compress the document first, ask after).

    python benchmarks/bench_questions.py                         # SmolLM2 on CPU: 2K, 4K, 8K documents, 5 questions
    python benchmarks/bench_questions.py --model llama2-7b --device cuda --dtype bfloat16 --lengths 16384

Time to first answer token per question (median over the questions): SnapKVDocument runs only
the question (the document's full KV streamed in per layer) vs a full prefill of document +
question. Accuracy: the five facts of `haystack.FACTS`, at 25% and 50% kept. On CUDA also the
host-to-device bytes per question (the document's KV) and the achieved bandwidth.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from snapkv_ext import SnapKVCache, SnapKVDocument  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from snapkv_ext.tools.haystack import FACTS, facts_document  # noqa: E402
from snapkv_ext.tools.models import RANDOM_SHAPES, load_by_name  # noqa: E402
from common import sync, timed  # noqa: E402


def ttft(fn, dev):
    """Seconds to the first answer token, on the host."""
    return timed(lambda: int(fn()[0].argmax()), dev)[0]


def answer(model, tok, ids, cache, n=16):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=n,
                             do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", *RANDOM_SHAPES])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--accuracy-length", type=int, default=4096)
    p.add_argument("--compression-ratio", type=float, default=0.25, help="budget for the timing runs")
    p.add_argument("--window-size", type=int, default=16)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, tok = load_by_name(args.model, args.device, args.dtype)
    dev = args.device
    kw = dict(compression_ratio=args.compression_ratio, window_size=args.window_size, kernel_size=args.kernel_size)
    rows = []
    for L in args.lengths:
        if tok is not None:
            doc, questions = facts_document(tok, L)
        else:
            g = torch.Generator().manual_seed(0)
            doc = torch.randint(10, 32000, (1, L), generator=g)
            questions = [(torch.randint(10, 32000, (1, 24), generator=g), None) for _ in FACTS]
        doc = doc.to(dev)
        t0 = time.perf_counter()
        d = SnapKVDocument(model, doc, **kw)
        sync(dev)
        read_s = time.perf_counter() - t0
        t_doc, t_re = [], []
        for q, _ in questions:
            q = q.to(dev)
            full = torch.cat([doc, q], dim=1)
            t_doc.append(ttft(lambda: d.prefill(q)[1], dev))
            t_re.append(ttft(lambda: model(full, **cache_kwargs(model, SnapKVCache(model, **kw)), use_cache=True,
                                           logits_to_keep=1).logits[:, -1], dev))
        row = dict(doc_tokens=doc.shape[1], questions=len(questions), read_once_s=read_s,
                   ttft_document_s=statistics.median(t_doc), ttft_reprefill_s=statistics.median(t_re))
        row["speedup"] = row["ttft_reprefill_s"] / row["ttft_document_s"]
        if dev.startswith("cuda"):
            row["h2d_bytes_per_question"] = d.nbytes()
            row["h2d_gbs_upper_bound"] = d.nbytes() / row["ttft_document_s"] / 1e9
        rows.append(row)
        print(f"doc {doc.shape[1]:6d} tokens: read once {read_s:.2f}s | time to first token per question: "
              f"document {row['ttft_document_s'] * 1e3:.0f} ms, re-prefill {row['ttft_reprefill_s'] * 1e3:.0f} ms "
              f"-> {row['speedup']:.1f}x", flush=True)
        del d
    acc = {}
    if tok is not None:
        doc, questions = facts_document(tok, args.accuracy_length)
        doc = doc.to(dev)
        for ratio in (0.25, 0.5):
            kwr = dict(compression_ratio=ratio, window_size=args.window_size, kernel_size=args.kernel_size)
            d = SnapKVDocument(model, doc, **kwr)
            agnostic = SnapKVCache(model, recompress=False, **kwr)
            with torch.no_grad():
                model(doc, **cache_kwargs(model, agnostic))
            right = {"document": 0, "question_agnostic": 0, "from_scratch": 0}
            for q, ans in questions:
                q = q.to(dev)
                full = torch.cat([doc, q], dim=1)
                a = tok.decode(d.generate(q, max_new_tokens=16, do_sample=False)[0], skip_special_tokens=True)
                right["document"] += ans in a
                right["question_agnostic"] += ans in answer(model, tok, full, copy.deepcopy(agnostic))
                right["from_scratch"] += ans in answer(model, tok, full, SnapKVCache(model, **kwr))
            acc[f"{int(ratio * 100)}%"] = right
            print(f"accuracy at {int(ratio * 100)}% kept, {doc.shape[1]}-token document, {len(questions)} questions: "
                  + ", ".join(f"{k} {v}/{len(questions)}" for k, v in right.items()), flush=True)
    if args.json:
        meta = dict(model=args.model, device=dev, dtype=args.dtype, torch=torch.__version__,
                    threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                    date=time.strftime("%Y-%m-%d"), argv=sys.argv)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, accuracy=acc), f, indent=1)


if __name__ == "__main__":
    main()
