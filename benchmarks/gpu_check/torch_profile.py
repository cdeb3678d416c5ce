"""Kernel-time table of each snapkv op under torch.profiler: profile.sh's stand-in where Nsight
Systems cannot make a report. Each case of the op benchmark (bench_ops.make_cases, its inputs)
runs inside record_function("bench::<case>") after a warm-up; the dispatcher's own entries are
named snapkv::<op>, like the NVTX ranges the ops open.

    python benchmarks/gpu_check/torch_profile.py [--config llama3-8b] [--dtype bfloat16] [--length 65536]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_ops  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3-8b", choices=sorted(bench_ops.CONFIGS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--trace", default=None, help="also write a Chrome trace (JSON) here")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    device = torch.device(a.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # The settings bench_ops.make_inputs/make_cases read, at their defaults.
    args = argparse.Namespace(batch=1, window_size=32, max_capacity_prompt=2048, kernel_size=7, ops=None)
    q, k, v = bench_ops.make_inputs(a.config, getattr(torch, a.dtype), a.length, args, device)
    cases = [(op, ours) for op, ours, _ in bench_ops.make_cases(q, k, v, args)]
    for _, fn in cases:  # warm-up: module load, allocator, first launches
        fn()
    bench_ops.sync(device)
    with profile(activities=activities) as prof:
        for op, fn in cases:
            for _ in range(a.iters):
                with record_function(f"bench::{op}"):
                    fn()
        bench_ops.sync(device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch.profiler: {a.config} {a.dtype} L={a.length}, {a.iters} calls of each op; {where}")
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=40))
    if a.trace:
        prof.export_chrome_trace(a.trace)


if __name__ == "__main__":
    main()
