"""Every CPU path (cpu_isa.h: avx512bf16, avx512, avx2, baseline) against the float64 reference,
each forced in turn: the AVX2 and baseline paths run on an AVX-512 machine too. A path this CPU
lacks is skipped with its name; the best path and the baseline run on every machine. Also: how a
path is forced (SNAPKV_CPU_ISA, set_cpu_isa) and refused, and what cpu_info() reports."""
import os
import subprocess
import sys

import pytest
import torch

import snapkv_ext
from snapkv_ext import ops, reference as ref
from snapkv_ext.cpu import ISAS

from conftest import assert_attention_close, assert_scores_close, randn, ragged_store

HERE = snapkv_ext.cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in HERE:
        pytest.skip(f"this CPU cannot run the {request.param} path (it has {', '.join(HERE)})")
    with snapkv_ext.forced_cpu_isa(request.param):
        assert snapkv_ext.cpu_isa() == request.param
        yield request.param


# (H_q, H_kv, D, L, w): GQA 1/3/4/8, head dims with tails (65, 80, 96), lengths that leave every
# remainder of the key tile (kKeys 4, 6, 8) and of the 256-key block.
SHAPES = [
    (8, 8, 128, 1025, 32),
    (9, 3, 64, 301, 16),
    (32, 8, 128, 777, 32),
    (8, 1, 80, 263, 8),
    (4, 4, 65, 97, 5),
    (3, 1, 96, 514, 3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hkv,D,L,w", SHAPES)
def test_window_scores(isa, gen, dtype, Hq, Hkv, D, L, w):
    q = randn((2, Hq, w, D), dtype, "cpu", gen)
    k = randn((2, Hkv, L, D), dtype, "cpu", gen, scale=2.0)
    assert_scores_close(ops.window_scores(q, k), q, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_scores_softcap_padding_reduce(isa, gen, dtype):
    q = randn((3, 8, 16, 64), dtype, "cpu", gen, scale=4.0)
    k = randn((3, 2, 700, 64), dtype, "cpu", gen, scale=2.0)
    pad = torch.tensor([0, 257, 680])
    for reduce in ("mean", "max", "sum"):
        assert_scores_close(ops.window_scores(q, k, pad, reduce, softcap=5.0), q, k, pad, reduce, softcap=5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_scores_kept_logits(isa, gen, dtype):
    """Many heads per worker (B * H_kv >= 16 * threads; one thread here, so on any machine) keep
    pass 1's exps for pass 2: with left padding that starts blocks mid-way, GQA, a soft-cap and
    every group reduction."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        q = randn((4, 16, 8, 64), dtype, "cpu", gen)
        k = randn((4, 16, 513, 64), dtype, "cpu", gen, scale=2.0)
        assert_scores_close(ops.window_scores(q, k), q, k)
        q = randn((4, 32, 8, 64), dtype, "cpu", gen, scale=4.0)
        pad = torch.tensor([0, 3, 256, 500])
        for reduce in ("mean", "max", "sum"):
            got = ops.window_scores(q, k, pad, reduce, softcap=5.0)
            assert_scores_close(got, q, k, pad, reduce, softcap=5.0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_scores_recomputed_logits(isa, gen, dtype):
    """Few heads per worker and more logits than window_scores keeps (8 MiB: 32 rows x 64K keys)
    recompute pass 1's logits in pass 2: with left padding, GQA, a soft-cap and every group reduction."""
    q = randn((2, 4, 8, 64), dtype, "cpu", gen, scale=4.0)
    k = randn((2, 1, 70_000, 64), dtype, "cpu", gen, scale=2.0)
    pad = torch.tensor([5, 40_000])
    for reduce in ("mean", "max"):
        got = ops.window_scores(q, k, pad, reduce, softcap=5.0)
        assert_scores_close(got, q, k, pad, reduce, softcap=5.0)


@pytest.mark.parametrize("pooling,kernel_size", [("max", 7), ("avg", 13), ("max", 1)])
def test_pool_scores(isa, gen, pooling, kernel_size):
    s = randn((2, 3, 999), torch.float32, "cpu", gen)
    pad = torch.tensor([0, 40])
    torch.testing.assert_close(ops.pool_scores(s, kernel_size, pooling, pad),
                               ref.pool_scores(s, kernel_size, pooling, pad).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_same_on_every_path(isa, gen, dtype):
    """The fused op keeps what the float64 pipeline ranks highest, and the kept rows exactly."""
    B, Hkv, G, L, D, w, C = 1, 2, 4, 1500, 128, 32, 300
    q = randn((B, Hkv * G, w, D), dtype, "cpu", gen)
    k = randn((B, Hkv, L, D), dtype, "cpu", gen, scale=2.0)
    v = randn((B, Hkv, L, D), dtype, "cpu", gen)
    ko, vo, pos = ops.snapkv_compress(q, k, v, C, 7, "max")
    s = ref.pool_scores(ref.window_scores(q, k).double(), 7, "max")
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(2, pos[..., : C - w], True)
    worst = s.masked_fill(~chosen, float("inf")).amin(2)
    best_dropped = s.masked_fill(chosen, float("-inf")).amax(2)
    assert (worst >= best_dropped - 1e-5 * s.amax(2)).all()
    idx = pos[..., None].expand(-1, -1, -1, D)
    assert torch.equal(ko, k.gather(2, idx)) and torch.equal(vo, v.gather(2, idx))


@pytest.mark.parametrize(
    "B,Hq,Hkv,n,D,lengths,dtype,softcap",
    [
        (1, 9, 3, 1, 64, [[1, 300, 97]], torch.float32, None),
        (2, 8, 2, 3, 80, [[3, 70], [129, 5]], torch.bfloat16, None),
        (1, 4, 4, 17, 65, [[17, 40, 200, 18]], torch.float16, 30.0),
        (1, 32, 32, 1, 128, [[600] * 32], torch.bfloat16, None),
        (1, 32, 8, 1, 128, [[1025, 3, 64, 700, 1, 90, 257, 31]], torch.float32, 5.0),
        # float32, key splits (2 segments, new tokens: causal, a head dim off the 16-float stride)
        (1, 4, 2, 5, 72, [[1500, 40]], torch.float32, None),
        # float32 items of >= 1024 keys take the portable path's BLAS products (shorter ones in the
        # same call the vector loops); 256 query rows cut a segment into blocks (scratch bound)
        (1, 8, 8, 1, 72, [[2100, 5, 1500, 300, 2100, 1, 1100, 64]], torch.float32, None),
        (1, 32, 8, 64, 64, [[2100, 1300, 70, 2100, 1024, 64, 2100, 1500]], torch.float32, 20.0),
    ],
)
def test_ragged_attention(isa, gen, B, Hq, Hkv, n, D, lengths, dtype, softcap):
    k, v, starts, lens = ragged_store(lengths, D, dtype, "cpu", gen)
    q = randn((B, Hq, n, D), dtype, "cpu", gen, scale=2.0)
    out = ops.ragged_attention(q, k, v, starts, lens, D ** -0.5, softcap)
    assert_attention_close(out, q, k, v, starts, lens, D ** -0.5, softcap)


# ---- forcing and naming a path ----


def test_paths_named():
    assert HERE[-1] == "baseline" and set(HERE) <= set(ISAS)
    assert HERE == [i for i in ISAS if i in HERE]  # best first
    info = snapkv_ext.cpu_info()
    assert info["isa"] == snapkv_ext.cpu_isa() and info["isas"] == HERE and info["model"]
    if "avx2" in HERE:
        assert {"avx2", "fma"} <= set(info["flags"])


def test_set_cpu_isa_refuses_bad_names():
    before = snapkv_ext.cpu_isa()
    with pytest.raises(ValueError, match="unknown CPU path 'sse9': expected auto, avx512bf16, avx512, avx2, baseline"):
        snapkv_ext.set_cpu_isa("sse9")
    with pytest.raises(TypeError, match="name must be a str"):
        snapkv_ext.set_cpu_isa(2)
    missing = [i for i in ISAS if i not in HERE]
    for name in missing:
        with pytest.raises(RuntimeError, match=f"CPU path '{name}' needs instructions this CPU lacks; it can run: "):
            snapkv_ext.set_cpu_isa(name)
    assert snapkv_ext.cpu_isa() == before  # a refused path changes nothing
    with snapkv_ext.forced_cpu_isa("baseline"):
        assert snapkv_ext.cpu_isa() == "baseline"
        with snapkv_ext.forced_cpu_isa("auto"):
            assert snapkv_ext.cpu_isa() == HERE[0]  # the best this CPU has
    assert snapkv_ext.cpu_isa() == before


def _child(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("SNAPKV_CPU_ISA", "SNAPKV_CPU_NO_BF16_DOT")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c",
                           "import snapkv_ext; print(snapkv_ext.cpu_isa())"],
                          env=env, capture_output=True, text=True)


def test_env_forces_and_refuses():
    out = _child({"SNAPKV_CPU_ISA": "baseline"})
    assert out.returncode == 0 and out.stdout.split()[-1] == "baseline", out.stderr
    out = _child({"SNAPKV_CPU_ISA": "avx9"})
    assert out.returncode != 0 and "SNAPKV_CPU_ISA=avx9: unknown CPU path 'avx9'" in out.stderr
    missing = [i for i in ISAS if i not in HERE]
    if missing:
        out = _child({"SNAPKV_CPU_ISA": missing[0]})
        assert out.returncode != 0 and f"SNAPKV_CPU_ISA={missing[0]}: CPU path" in out.stderr


def test_former_bf16_switch_still_works():
    """SNAPKV_CPU_NO_BF16_DOT=1, the former switch, warns and names SNAPKV_CPU_ISA=avx512; on an
    AVX512-BF16 CPU it still turns the dot product off."""
    out = _child({"SNAPKV_CPU_NO_BF16_DOT": "1"})
    assert out.returncode == 0, out.stderr
    assert "SNAPKV_CPU_NO_BF16_DOT is deprecated: use SNAPKV_CPU_ISA=avx512" in out.stderr
    assert out.stdout.split()[-1] == ("avx512" if HERE[0] == "avx512bf16" else HERE[0])
