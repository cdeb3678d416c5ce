"""Op benchmark: each snapkv op and the fused path against plain torch, side by side, in one run.

The baseline is the computation as the public SnapKV implementations write it: repeat the KV
heads for GQA, matmul the window queries against all keys, mask, softmax in fp32, sum over the
window, pool, topk, gather from the repeated cache. Ours selects per KV head without repeating.

    python benchmarks/bench_ops.py                         # CPU, L = 4K..32K
    python benchmarks/bench_ops.py --device cuda --lengths 4096 16384 32768 65536 131072
    python benchmarks/bench_ops.py --json out.json
    python benchmarks/bench_ops.py --decode                # ragged_attention vs SDPA, decode shapes
    python benchmarks/bench_ops.py --cpu-isas all          # every CPU path this machine has, forced in turn

The output and the JSON name the CPU (model, vector flags) and the CPU path of every row.

--decode times ragged_attention (one new token, every KV head's segment in a flat store) against
torch's scaled_dot_product_attention(enable_gqa=True) on a dense [B, H_kv, T, D] cache holding the
same entries: SmolLM2 (H_q 9, H_kv 3, D 64) at T 1K-4K, B 1 and 3; Llama-3-8B (32/8/128) and an
MHA 7B (LWM, 32/32/128) at T 2K-8K, B 1. GB/s counts the keys and values read once.

Reported per (config, dtype, L): median milliseconds of ours and of torch (timed alternately),
torch/ours (the speedup), and for each the peak extra memory of one call (outputs included) and its workspace
(peak minus what the call leaves allocated, i.e. without the outputs). CPU memory is the peak-RSS
growth measured in a child process whose malloc returns every large block to the OS on free
(so the counter sees every allocation; timings run in this process with the default malloc);
CUDA memory is torch's peak allocated bytes.

On CUDA, window_scores also gets its achieved bandwidth. key_bytes = B*H_kv*L*D*itemsize; in the
same run a device-to-device copy of a tensor the size of the keys is timed (torch.empty_like(k)
.copy_(k), 2*key_bytes moved), giving the copy bandwidth at that size. Reported: keys_gbs =
key_bytes / time ("GB/s as one key read": the kernel makes two passes over the keys, so the bytes
it really reads are about twice that), keys_read_ms = key_bytes / copy bandwidth (half the copy's
time), and vs_keys_read = time / keys_read_ms, against the target of <= 2.5x. Keys of a few MB fit
in L2 (50 MB on an H100), and then both the copy and the kernel run from it: read the ratio at
lengths whose keys are several times L2. The 1 GiB copy bandwidth printed first (and kept in the
JSON's meta) is the device's DRAM ceiling.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import subprocess  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import snapkv_ext  # noqa: E402
from common import write_json  # noqa: E402
from snapkv_ext import ops  # noqa: E402

CONFIGS = {
    # name: (H_q, H_kv, D)
    "llama3-8b": (32, 8, 128),
    "mistral-7b": (32, 8, 128),
    "lwm-7b": (32, 32, 128),
    "qwen2-7b": (28, 4, 128),
    "gemma2-9b": (16, 8, 256),
}

# Decode shapes for ragged_attention: name -> (H_q, H_kv, D, lengths, batches).
DECODE_CONFIGS = {
    "smollm2": (9, 3, 64, [1024, 2048, 4096], [1, 3]),
    "llama3-8b": (32, 8, 128, [2048, 4096, 8192], [1]),
    "lwm-7b": (32, 32, 128, [2048, 4096, 8192], [1]),
}


# ---------------------------------------------------------------- the plain-torch baseline
def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, group, L, D).reshape(B, H * group, L, D)


def torch_scores(q, k, softcap=None):
    """[B, H_q, L - w] window votes per query head, as the public implementations compute them
    (with Gemma 2's soft-cap, as its eager attention applies it, when given)."""
    w, D = q.shape[2], q.shape[3]
    kr = repeat_kv(k, q.shape[1] // k.shape[1])
    attn = torch.matmul(q, kr.transpose(2, 3)) / math.sqrt(D)
    if softcap is not None:
        attn = torch.tanh(attn / softcap) * softcap
    causal = torch.full((w, w), torch.finfo(attn.dtype).min, device=q.device).triu(1)
    attn[:, :, :, -w:] += causal
    attn = torch.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    return attn[:, :, :, :-w].sum(dim=-2)


def torch_compress(q, k, v, capacity, kernel_size):
    w, D = q.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    kr, vr = repeat_kv(k, group), repeat_kv(v, group)
    s = F.max_pool1d(torch_scores(q, k), kernel_size, stride=1, padding=kernel_size // 2)
    idx = s.topk(capacity - w, dim=-1).indices[..., None].expand(-1, -1, -1, D)
    k_out = torch.cat([kr[:, :, :-w].gather(2, idx), kr[:, :, -w:]], dim=2)
    v_out = torch.cat([vr[:, :, :-w].gather(2, idx), vr[:, :, -w:]], dim=2)
    return k_out, v_out


# ---------------------------------------------------------------- measurement
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def once_ms(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(once_ms(fn, device) for _ in range(reps))


def paired_median_ms(ours, base, device, reps, warmup=2):
    """Medians of ours and base, timed alternately (so both see the same machine state)."""
    for _ in range(warmup):
        ours()
        base()
    sync(device)
    t_ours, t_base = [], []
    for _ in range(reps):
        t_ours.append(once_ms(ours, device))
        t_base.append(once_ms(base, device))
    return statistics.median(t_ours), statistics.median(t_base)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(fn, device):
    """(peak, workspace) MB of one call: peak memory beyond what existed before it (outputs
    included), and that peak minus what the call leaves allocated (its outputs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        kept = torch.cuda.memory_allocated() - base
        del out
        return peak / 2**20, (peak - kept) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM") - base
    kept = _status_kb("VmRSS") - base
    del out
    return peak / 1024, (peak - kept) / 1024


def make_inputs(name, dtype, L, args, device):
    H_q, H_kv, D = CONFIGS[name]
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(args.batch, H_q, args.window_size, D, generator=g).to(dtype=dtype, device=device)
    k = torch.randn(args.batch, H_kv, L, D, generator=g).to(dtype=dtype, device=device)
    v = torch.randn(args.batch, H_kv, L, D, generator=g).to(dtype=dtype, device=device)
    return q, k, v


def make_cases(q, k, v, args):
    """[(op, ours, torch)] callables on prepared inputs."""
    C, ks, w, D = args.max_capacity_prompt, args.kernel_size, args.window_size, q.shape[3]
    s_ours = ops.window_scores(q, k)
    pooled = ops.pool_scores(s_ours, ks, "max")
    idx = ops.select_topk(pooled, C - w)
    gidx = idx[..., None].expand(-1, -1, -1, D)
    cases = [
        ("window_scores", lambda: ops.window_scores(q, k), lambda: torch_scores(q, k)),
        # Gemma 2's soft-capped logits (cap 50, as its configs): the cost of the cap.
        ("window_scores_softcap", lambda: ops.window_scores(q, k, softcap=50.0),
         lambda: torch_scores(q, k, softcap=50.0)),
        ("pool_scores", lambda: ops.pool_scores(s_ours, ks, "max"),
         lambda: F.max_pool1d(s_ours, ks, stride=1, padding=ks // 2)),
        ("select_topk", lambda: ops.select_topk(pooled, C - w),
         lambda: pooled.topk(C - w, dim=-1).indices.sort(dim=-1).values),
        ("compact", lambda: ops.compact(k, v, idx, w),
         lambda: (torch.cat([k[:, :, :-w].gather(2, gidx), k[:, :, -w:]], 2),
                  torch.cat([v[:, :, :-w].gather(2, gidx), v[:, :, -w:]], 2))),
        ("fused", lambda: ops.snapkv_compress(q, k, v, C, ks, "max"), lambda: torch_compress(q, k, v, C, ks)),
        # The fused path as SnapKVCache runs it: into the cache's preallocated buffers (made and
        # touched before the call, so the call's extra memory is what it needs besides the cache).
        # The baseline computes its outputs as above, then copies them into the same buffers.
        ("fused_into", lambda: ops.snapkv_compress_into(q, k, v, C, *bufs, ks, "max"),
         lambda: [b.copy_(o) for b, o in zip(bufs_base, torch_compress(q, k, v, C, ks))]),
    ]
    # Ours keeps H_kv heads; the baseline keeps the repeated H_q heads it selected from.
    bufs = (k.new_zeros(k.shape[0], k.shape[1], C, D), v.new_zeros(v.shape[0], v.shape[1], C, D))
    bufs_base = (k.new_zeros(k.shape[0], q.shape[1], C, D), v.new_zeros(v.shape[0], q.shape[1], C, D))
    return [c for c in cases if not args.ops or c[0] in args.ops]


def make_decode_case(name, dtype, T, B, device):
    """(ours, sdpa, bytes): one new token per head against T entries per KV head, in a flat store
    for ours (segments back to back) and as the dense cache SDPA takes."""
    H_q, H_kv, D = DECODE_CONFIGS[name][:3]
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H_q, 1, D, generator=g).to(dtype=dtype, device=device)
    kd = torch.randn(B, H_kv, T, D, generator=g).to(dtype=dtype, device=device)
    vd = torch.randn(B, H_kv, T, D, generator=g).to(dtype=dtype, device=device)
    k, v = kd.reshape(-1, D), vd.reshape(-1, D)
    starts = (torch.arange(B * H_kv, device=device) * T).view(B, H_kv)
    lengths = torch.full((B, H_kv), T, device=device)
    scale = D ** -0.5
    ours = lambda: ops.ragged_attention(q, k, v, starts, lengths, scale)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)  # noqa: E731
    return ours, sdpa, 2 * kd.numel() * kd.element_size()


def run_decode(args, emit):
    device = torch.device(args.device)
    for name, (_, _, _, lengths, batches) in DECODE_CONFIGS.items():
        if args.decode_configs and name not in args.decode_configs:
            continue
        for dtype_name in args.dtypes:
            for B in batches:
                for T in lengths:
                    ours, sdpa, nbytes = make_decode_case(name, getattr(torch, dtype_name), T, B, device)
                    t_ours, t_base = paired_median_ms(ours, sdpa, device, args.reps, warmup=5)
                    row = dict(config=name, dtype=dtype_name, B=B, T=T, op="ragged_attention", ours_ms=t_ours,
                               sdpa_ms=t_base, speedup=t_base / t_ours, kv_bytes=nbytes,
                               ours_gbs=nbytes / (t_ours * 1e-3) / 1e9)
                    emit(row)
                    print(f"{name:10s} {dtype_name:8s} B={B} T={T:5d} ragged_attention ours {t_ours * 1e3:8.1f} us  "
                          f"sdpa {t_base * 1e3:8.1f} us  sdpa/ours {t_base / t_ours:5.2f}x  "
                          f"ours {row['ours_gbs']:5.1f} GB/s", flush=True)


def memory_child(args):
    """Runs in a child process: prints {op: [ours_peak, ours_ws, torch_peak, torch_ws]} as JSON."""
    device = torch.device("cpu")
    q, k, v = make_inputs(args.configs[0], getattr(torch, args.dtypes[0]), args.lengths[0], args, device)
    res = {}
    for op, ours, base in make_cases(q, k, v, args):
        res[op] = [*peak_extra_mb(ours, device), *peak_extra_mb(base, device)]
    print(json.dumps(res))


def cpu_memory(name, dtype_name, L, args):
    """Measures CPU memory in a fresh child whose malloc mmaps (and unmaps) every block >= 64 KiB:
    otherwise glibc keeps freed blocks in its heap and the peak-RSS counter misses reuse."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--configs", name, "--dtypes", dtype_name,
           "--lengths", str(L), "--batch", str(args.batch), "--window-size", str(args.window_size),
           "--max-capacity-prompt", str(args.max_capacity_prompt), "--kernel-size", str(args.kernel_size)]
    cmd += ["--ops", *args.ops] if args.ops else []
    # 4 KB pages: RSS counts a handful of 2 MB page faults late (per-CPU counters), so the
    # huge-page advice for large outputs is off in the child (same bytes, precise counter).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", SNAPKV_CPU_NO_HUGE_PAGES="1",
               SNAPKV_CPU_ISA=snapkv_ext.cpu_isa())
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def copy_bandwidth_gbs(device, nbytes=1 << 30):
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


def key_copy_ms(k, device, reps):
    """Median time of a device-to-device copy of a tensor the size of k (2 * k's bytes moved)."""
    dst = torch.empty_like(k)
    return median_ms(lambda: dst.copy_(k), device, reps=max(reps, 10), warmup=3)


KEYS_READ_TARGET = 2.5  # window_scores time <= 2.5x reading the keys once at the copy bandwidth


def run(args, emit, meta):
    """Every case of the sweep; each row goes to ``emit`` as it is measured."""
    device = torch.device(args.device)
    if device.type == "cuda":
        assert torch.cuda.is_available(), "--device cuda needs a GPU"
        assert snapkv_ext.has_cuda_kernels(), "snapkv_ext was built without its CUDA kernels"
    bw = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    if bw:
        meta["copy_bandwidth_gbs"] = bw
        print(f"measured copy bandwidth: {bw:.0f} GB/s (read + write)")
    for name in args.configs:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for L in args.lengths:
                q, k, v = make_inputs(name, dtype, L, args, device)
                mem = cpu_memory(name, dtype_name, L, args) if device.type == "cpu" and not args.no_memory else None
                key_bytes = k.numel() * k.element_size()
                copy_ms = (key_copy_ms(k, device, args.reps)
                           if device.type == "cuda" and (not args.ops or "window_scores" in args.ops) else None)
                for op, ours, base in make_cases(q, k, v, args):
                    t_ours, t_base = paired_median_ms(ours, base, device, args.reps)
                    if mem is not None:
                        m_ours, ws_ours, m_base, ws_base = mem[op]
                    elif device.type == "cpu":  # --no-memory
                        m_ours = ws_ours = m_base = ws_base = float("nan")
                    else:
                        (m_ours, ws_ours), (m_base, ws_base) = peak_extra_mb(ours, device), peak_extra_mb(base, device)
                    row = dict(config=name, dtype=dtype_name, L=L, op=op, ours_ms=t_ours, torch_ms=t_base,
                               speedup=t_base / t_ours, ours_peak_mb=m_ours, torch_peak_mb=m_base,
                               ours_workspace_mb=ws_ours, torch_workspace_mb=ws_base)
                    extra = ""
                    if copy_ms and op == "window_scores":
                        read_ms = copy_ms / 2  # key_bytes at the copy bandwidth 2 * key_bytes / copy_ms
                        row.update(key_bytes=key_bytes, key_copy_ms=copy_ms,
                                   key_copy_gbs=2 * key_bytes / (copy_ms * 1e-3) / 1e9,
                                   keys_gbs=key_bytes / (t_ours * 1e-3) / 1e9,
                                   keys_read_ms=read_ms, vs_keys_read=t_ours / read_ms,
                                   keys_read_target=KEYS_READ_TARGET)
                        extra = (f"  keys {row['keys_gbs']:6.0f} GB/s as one read, {row['vs_keys_read']:5.2f}x one read"
                                 f" at copy bw {row['key_copy_gbs']:.0f} GB/s"
                                 f" ({'meets' if row['vs_keys_read'] <= KEYS_READ_TARGET else 'misses'}"
                                 f" <= {KEYS_READ_TARGET}x)")
                    emit(row)
                    print(f"{name:10s} {dtype_name:8s} L={L:6d} {op:13s} ours {t_ours:8.2f} ms  torch {t_base:8.2f} ms"
                          f"  speedup {t_base / t_ours:5.2f}x  peak MB ours {m_ours:7.1f} torch {m_base:7.1f}"
                          f"  workspace MB ours {ws_ours:6.1f} torch {ws_base:7.1f}{extra}", flush=True)
                del q, k, v
                gc.collect()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="+", default=["llama3-8b", "lwm-7b"], choices=sorted(CONFIGS))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    p.add_argument("--ops", nargs="*", default=None,
                   help="subset of window_scores window_scores_softcap pool_scores select_topk compact fused fused_into")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--max-capacity-prompt", type=int, default=2048)
    p.add_argument("--kernel-size", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-memory", action="store_true",
                   help="CPU: leave out the memory columns (each shape otherwise reads its RSS in a child process)")
    p.add_argument("--decode", action="store_true", help="ragged_attention vs SDPA on decode shapes")
    p.add_argument("--decode-configs", nargs="*", default=None, choices=sorted(DECODE_CONFIGS))
    p.add_argument("--cpu-isas", nargs="+", default=None,
                   help="CPU paths to measure, each forced in turn (names from snapkv_ext.cpu_isas(), or 'all'); "
                        "default: the active one")
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    info = snapkv_ext.cpu_info()
    isas = [info["isa"]] if not args.cpu_isas else info["isas"] if args.cpu_isas == ["all"] else args.cpu_isas
    print(f"CPU: {info['model']} ({info['machine']}, {info['cores']} cores, flags {' '.join(info['flags'])}); "
          f"paths it runs: {', '.join(info['isas'])}; measuring: {', '.join(isas)}", flush=True)
    rows = []
    meta = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine(), cpu=info, copy_bandwidth_gbs=None,
                gpu=torch.cuda.get_device_name() if args.device == "cuda" else None,
                date=time.strftime("%Y-%m-%d"), argv=sys.argv)
    for isa in isas:
        def emit(row, isa=isa):
            # The JSON is rewritten after every row: a run stopped part way keeps what it measured.
            rows.append(dict(row, cpu_isa=isa))
            if args.json:
                write_json(args.json, dict(meta=meta, rows=rows))

        with snapkv_ext.forced_cpu_isa(isa):
            print(f"-- CPU path {isa}", flush=True)
            if args.decode:
                run_decode(args, emit)
            else:
                run(args, emit, meta)


if __name__ == "__main__":
    main()
