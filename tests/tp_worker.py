"""One process of a tensor-parallel run, launched by tests/test_scale_out.py through torchrun
(2 processes, gloo, CPU): loads each saved model with Transformers' tensor parallelism and
records, for the test to compare with its single-process run, what this process generates and
keeps. Nothing is asserted here: the test does that.

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py SPEC.json
"""
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist

warnings.simplefilter("ignore")  # Transformers' notes about the distributed load, on every rank
from transformers import AutoModelForCausalLM  # noqa: E402

from conftest import greedy, prompt  # noqa: E402
from snapkv_ext import SnapKVCache, SnapKVDocument  # noqa: E402


def load(path, distributed=None):
    """The model unsharded (in this process), or as DistributedConfig(**distributed) splits it."""
    if distributed is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    from transformers.distributed import DistributedConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                distributed_config=DistributedConfig(**distributed)).eval()


def error(fn) -> str:
    """The message of the error fn() raises ('' if none)."""
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def run_case(case: dict, kw: dict) -> dict:
    ids, doc, question = prompt(case["prompt"]), prompt(case["doc"], seed=1), prompt(case["question"], seed=2)
    model = load(case["path"], {"tp_plan": "auto"})
    cache = SnapKVCache(model, **kw)
    out = {"tokens": greedy(model, ids, cache, n=case["new"]),
           "kept": [layer.positions.clone() for layer in cache.layers],
           "kv_bytes": cache.stats()["kv_bytes"]}
    document = SnapKVDocument(model, doc, **kw)
    out["doc_bytes"] = document.nbytes()
    out["doc_tokens"] = document.generate(question, max_new_tokens=case["new"], min_new_tokens=case["new"],
                                          do_sample=False, pad_token_id=0)
    out["doc_batch"] = document.generate([question, prompt(9, seed=4)], max_new_tokens=4)
    # A cache made from the unsharded model, used with the sharded one, and the reverse.
    plain = load(case["path"])
    out["unsharded_cache_on_sharded_model"] = error(lambda: greedy(model, ids, SnapKVCache(plain, **kw), n=1))
    out["sharded_cache_on_unsharded_model"] = error(lambda: greedy(plain, ids, SnapKVCache(model, **kw), n=1))
    return out


def main():
    spec = json.load(open(sys.argv[1]))
    results = {}
    for case in spec["cases"]:
        if "refused" in case:  # a sharding the cache must refuse, at construction, in one line
            model = load(case["path"], case["distributed"])
            results[case["name"]] = {"cache": error(lambda: SnapKVCache(model, **spec["kw"])),
                                     "document": error(lambda: SnapKVDocument(model, prompt(60), **spec["kw"]))}
        else:
            results[case["name"]] = run_case(case, spec["kw"])
    torch.save(results, os.path.join(spec["out"], f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
