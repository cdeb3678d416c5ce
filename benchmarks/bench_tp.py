"""Tensor parallel: SnapKVCache against DynamicCache under the same sharding, per process.

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py                      # CPU (gloo), a 103M-parameter Llama
    torchrun --nproc-per-node <gpus> benchmarks/bench_tp.py --shape llama3-8b --layers 8 \
        --dtype bfloat16 --lengths 16384 --max-capacity-prompt 2048       # GPUs (NCCL), one per process

A random-weight Llama of the shape asked is saved once (by rank 0, in a temporary directory) and
loaded by every process with Transformers' tensor parallelism (``DistributedConfig(tp_plan="auto")``:
each process holds 1/world of the heads and of the MLP). Per prompt length, interleaving the two
caches ``--reps`` times: the prompt's prefill (logits of the last token only, as generate does),
then ``--steps`` greedy decoding steps; each process reports its own KV bytes (after the prompt and
the decoded steps) and its median decoding step (the first step of each run left out). Rank 0
prints one row per process and writes ``--json``. With ``--nproc-per-node 1`` the same script
measures the unsharded model.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from common import timed  # noqa: E402
from snapkv_ext import SnapKVCache  # noqa: E402
from snapkv_ext.cache import cache_kwargs  # noqa: E402
from snapkv_ext.tools.evaluate import cache_bytes  # noqa: E402
from snapkv_ext.tools.models import RANDOM_SHAPES  # noqa: E402

# "small": a Llama a CPU runs in seconds per prefill (GQA 16/8, head_dim 64, 8 layers, 103M parameters).
SHAPES = {
    "small": dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=8),
    **RANDOM_SHAPES,
}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(args) -> str:
    """Rank 0 writes the random-weight model; every rank gets its directory."""
    path = [None]
    if rank() == 0:
        cfg = LlamaConfig(max_position_embeddings=1 << 20, **dict(SHAPES[args.shape], **(
            {"num_hidden_layers": args.layers} if args.layers else {})))
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype))
        path[0] = tempfile.mkdtemp(prefix="bench_tp_")
        model.save_pretrained(path[0])
        del model
    if dist.is_initialized():
        dist.broadcast_object_list(path, src=0)
    return path[0]


def load(path: str, args):
    from transformers.distributed import DistributedConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw = dict(distributed_config=DistributedConfig(tp_plan="auto")) if world > 1 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype),
                                                     attn_implementation="sdpa", **kw)
    if world == 1 and args.device != "cpu":
        model = model.to(args.device)
    return model.eval()


def run(model, ids, cache, steps: int, device):
    """(prefill s, [ms per decoding step], cache)."""
    with torch.no_grad():
        dt, logits = timed(lambda: model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits,
                           device)
        tok = logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t, logits = timed(lambda: model(tok, **cache_kwargs(model, cache), use_cache=True).logits, device)
            tok = logits[:, -1:].argmax(-1)
            times.append(t * 1e3)
    return dt, times[1:]


def bench_length(model, L: int, args) -> dict:
    device = model.device
    g = torch.Generator().manual_seed(L)
    ids = torch.randint(10, model.config.vocab_size, (1, L), generator=g).to(device)
    caches = {"dynamic": lambda: DynamicCache(config=model.config),
              "snapkv": lambda: SnapKVCache(model, max_capacity_prompt=args.max_capacity_prompt,
                                            window_size=args.window_size, kernel_size=args.kernel_size,
                                            decode_reserve=args.steps + 8)}
    prefill = {k: [] for k in caches}
    decode = {k: [] for k in caches}
    kv = {}
    for _ in range(args.reps):  # interleaved: A B A B ...
        for name, make in caches.items():
            gc.collect()
            cache = make()
            dt, steps = run(model, ids, cache, args.steps, device)
            prefill[name].append(dt)
            decode[name].extend(steps)
            kv[name] = cache_bytes(cache)  # after the prompt and the decoded tokens
            del cache
    row = dict(rank=rank(), L=L)
    for name in caches:
        row[f"kv_bytes_{name}"] = kv[name]
        row[f"prefill_{name}_s"] = statistics.median(prefill[name])
        row[f"decode_{name}_ms"] = statistics.median(decode[name])
    row["kv_reduction"] = row["kv_bytes_dynamic"] / row["kv_bytes_snapkv"]
    row["decode_speedup"] = row["decode_dynamic_ms"] / row["decode_snapkv_ms"]
    row["prefill_ratio"] = row["prefill_snapkv_s"] / row["prefill_dynamic_s"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="with --nproc-per-node 1 only; under torchrun Transformers "
                                                     "puts each process on its own GPU when there are GPUs")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--max-capacity-prompt", type=int, default=512)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    path = save_model(args)
    model = load(path, args)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows = []
    for L in args.lengths:
        row = bench_length(model, L, args)
        gathered = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(gathered, row)
        else:
            gathered = [row]
        rows.extend(gathered)
        if rank() == 0:
            for r in gathered:
                print(f"L={L:6d} rank {r['rank']}/{world} | KV MB dynamic {r['kv_bytes_dynamic'] / 2**20:8.2f} "
                      f"snapkv {r['kv_bytes_snapkv'] / 2**20:7.2f} ({r['kv_reduction']:.2f}x less) | decode ms "
                      f"dynamic {r['decode_dynamic_ms']:7.2f} snapkv {r['decode_snapkv_ms']:7.2f} "
                      f"({r['decode_speedup']:.2f}x) | prefill s dynamic {r['prefill_dynamic_s']:.2f} snapkv "
                      f"{r['prefill_snapkv_s']:.2f} ({r['prefill_ratio']:.3f})", flush=True)
    if rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        if args.json:
            meta = dict(shape=args.shape, layers=model.config.num_hidden_layers, world=world,
                        backend=dist.get_backend() if dist.is_initialized() else None, device=str(model.device),
                        dtype=args.dtype, torch=torch.__version__, threads=torch.get_num_threads(),
                        machine=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d %H:%M"),
                        argv=sys.argv, max_capacity_prompt=args.max_capacity_prompt, window_size=args.window_size,
                        kernel_size=args.kernel_size, reps=args.reps, steps=args.steps)
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
