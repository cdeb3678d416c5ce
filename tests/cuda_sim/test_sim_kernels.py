"""Every CUDA kernel of csrc/cuda/, its body unmodified, run on the CPU by the simulator
(cuda_sim.h) under AddressSanitizer/UBSan, against the float64 reference, on awkward shapes.

Run through tests/test_cuda_sim.py (which starts this file's process with the ASan runtime
preloaded), or by hand:
    LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0 \\
        python -m pytest tests/cuda_sim
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import simbuild  # noqa: E402
from conftest import assert_scores_close  # noqa: E402  (tests/conftest.py)
from snapkv_ext import reference as ref  # noqa: E402

if "libasan" not in os.environ.get("LD_PRELOAD", "") and not os.environ.get("SNAPKV_SIM_ASAN_LOADED"):
    pytest.exit("run the simulator tests through tests/test_cuda_sim.py (they need the ASan runtime preloaded)", 2)
os.environ["SNAPKV_SIM_ASAN_LOADED"] = "1"

sim = simbuild.load()
H100_SMEM = 227 * 1024
A100_SMEM = 163 * 1024


@pytest.fixture(autouse=True)
def default_config():
    sim.configure("forward", 2, 132, H100_SMEM)
    yield
    sim.configure("forward", 2, 132, H100_SMEM)


def rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def both_orders(fn):
    """Runs fn with the block's threads scheduled forward, then in reverse; the outputs must be
    bit-identical (a race or a missing barrier shows as a difference)."""
    sim.configure("forward", 2, 132, H100_SMEM)
    a = fn()
    sim.configure("reverse", 2, 132, H100_SMEM)
    b = fn()
    sim.configure("forward", 2, 132, H100_SMEM)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y), "forward and reverse thread orders disagree"
    return a


# ---------------------------------------------------------------- window_scores
# (B, H_q, H_kv, w, L, D, dtype, pad, group_reduce): head dims 64/65/80/96/128/256, GQA groups
# 1/3/4/8, windows 1/16/32/40, L from w + 1 to a few thousand, padding up to L - w.
WS_CASES = [
    (1, 1, 1, 1, 2, 64, torch.float32, None, "mean"),
    (1, 3, 1, 16, 17, 65, torch.bfloat16, None, "mean"),
    (2, 8, 2, 32, 300, 128, torch.bfloat16, [0, 37], "mean"),
    (1, 8, 1, 40, 333, 80, torch.float16, None, "max"),
    (2, 4, 1, 16, 129, 96, torch.float32, [3, 113], "sum"),
    (1, 16, 2, 32, 1025, 128, torch.bfloat16, None, "max"),
    (1, 2, 2, 32, 2049, 64, torch.float16, [2017], "mean"),
    (1, 2, 1, 16, 97, 256, torch.bfloat16, [0], "mean"),
    (1, 1, 1, 32, 4099, 128, torch.float32, [1000], "mean"),
    (1, 3, 3, 40, 201, 65, torch.float32, [161], "max"),
]


@pytest.mark.parametrize("B,Hq,Hkv,w,L,D,dtype,pad,reduce", WS_CASES)
def test_window_scores(B, Hq, Hkv, w, L, D, dtype, pad, reduce):
    q = rand((B, Hq, w, D), dtype, L + D, scale=2.0)
    k = rand((B, Hkv, L, D), dtype, L * D)
    p = None if pad is None else torch.tensor(pad)
    out = both_orders(lambda: sim.window_scores(q, k, p, reduce, None))
    assert_scores_close(out, q, k, p, reduce)
    if p is not None:
        for b in range(B):
            assert (out[b, :, : pad[b]] == 0).all(), "padded positions score 0"


@pytest.mark.parametrize("sm_count,max_smem", [(1, H100_SMEM), (132, A100_SMEM), (4, 48 * 1024), (132, 40 * 1024)])
def test_window_scores_plans(sm_count, max_smem):
    """The same problem with one CTA per head, many CTAs, and row blocks of 64 / 16 rows (so the
    keys are streamed once per row block and a head's window is split across blocks)."""
    q = rand((2, 8, 40, 96), torch.bfloat16, 1, scale=2.0)
    k = rand((2, 2, 700, 96), torch.bfloat16, 2)
    p = torch.tensor([5, 0])
    sim.configure("forward", 2, sm_count, max_smem)
    for reduce in ("mean", "max"):
        assert_scores_close(sim.window_scores(q, k, p, reduce, None), q, k, p, reduce)


def test_window_scores_shared_memory_queries(monkeypatch):
    """SNAPKV_WS_RESIDENT=0: the same shapes with the query fragments read from shared memory
    (the variant a GPU session compares against the register-resident one)."""
    monkeypatch.setenv("SNAPKV_WS_RESIDENT", "0")
    q = rand((2, 8, 32, 128), torch.bfloat16, 11, scale=2.0)
    k = rand((2, 2, 300, 128), torch.bfloat16, 12)
    assert_scores_close(both_orders(lambda: sim.window_scores(q, k, None, "mean", None)), q, k)


def test_window_scores_scale_and_orders():
    """An explicit scale (e.g. Gemma's query_pre_attn_scalar) and both thread orders."""
    q = rand((1, 4, 32, 80), torch.float16, 3, scale=3.0)
    k = rand((1, 2, 513, 80), torch.float16, 4)
    out = both_orders(lambda: sim.window_scores(q, k, None, "mean", 0.0625))
    want = ref.window_scores(q, k, None, "mean", 0.0625)
    fp32 = ref.window_scores(q, k, None, "mean", 0.0625, dtype=torch.float32)
    assert (out - want).abs().max() <= 2 * (fp32 - want).abs().max() + 1e-9 + 1e-6 * want.abs().max()


# Soft-capped logits (Gemma 2): the kernels built with the cap, both passes. Register-resident
# queries (16-bit, a 128-row block, D <= 128), shared-memory queries (fewer rows, or D > 128),
# float32's 3xTF32; odd head dims, several row blocks, padding. Queries large enough that a cap
# of 5 bends most logits.
# (B, H_q, H_kv, w, L, D, dtype, pad, group_reduce, softcap)
WS_SOFTCAP_CASES = [
    (2, 8, 2, 32, 300, 128, torch.bfloat16, [0, 37], "mean", 5.0),  # 128 rows: resident
    (1, 16, 2, 32, 1025, 96, torch.float16, None, "max", 20.0),    # 256 rows: resident, two row blocks
    (1, 3, 1, 16, 17, 65, torch.bfloat16, None, "mean", 5.0),      # 48 rows in shared memory, D % 16 != 0
    (1, 8, 1, 16, 200, 256, torch.bfloat16, [11], "sum", 5.0),     # D > 128: shared-memory queries
    (2, 4, 1, 16, 129, 96, torch.float32, [3, 113], "sum", 5.0),   # 3xTF32
    (1, 3, 3, 40, 201, 65, torch.float32, [161], "max", 50.0),     # 3xTF32, head split across blocks
    (1, 1, 1, 1, 2, 64, torch.float32, None, "mean", 5.0),
]


@pytest.mark.parametrize("B,Hq,Hkv,w,L,D,dtype,pad,reduce,softcap", WS_SOFTCAP_CASES)
def test_window_scores_softcap(B, Hq, Hkv, w, L, D, dtype, pad, reduce, softcap):
    q = rand((B, Hq, w, D), dtype, L + D + 1, scale=4.0)
    k = rand((B, Hkv, L, D), dtype, L * D + 1, scale=1.5)
    p = None if pad is None else torch.tensor(pad)
    out = both_orders(lambda: sim.window_scores(q, k, p, reduce, None, softcap))
    assert_scores_close(out, q, k, p, reduce, softcap=softcap)


@pytest.mark.parametrize("resident", ["1", "0"])
def test_window_scores_softcap_changes_votes(monkeypatch, resident):
    """The cap is applied to the scaled logit (scale 0.1 here) in the statistics and the votes
    pass alike (one pass without it misses the reference), with the query fragments in
    registers and in shared memory; it changes the votes and the selection."""
    monkeypatch.setenv("SNAPKV_WS_RESIDENT", resident)
    q = rand((1, 8, 16, 64), torch.bfloat16, 21, scale=4.0)
    k = rand((1, 1, 400, 64), torch.bfloat16, 22, scale=2.0)
    capped = sim.window_scores(q, k, None, "mean", 0.1, 5.0)
    assert_scores_close(capped, q, k, None, "mean", scale=0.1, softcap=5.0)
    plain = sim.window_scores(q, k, None, "mean", 0.1)
    assert (capped - plain).abs().max() > 0.1 * plain.abs().max()
    assert not torch.equal(sim.select_topk(capped, 64), sim.select_topk(plain, 64))


def test_window_scores_unaligned_keys():
    """Keys whose rows are not 16-byte aligned take the plain-load path (no async copies)."""
    base = rand((1, 2, 300 * 64 + 1), torch.bfloat16, 5)
    k = base[..., 1:].view(1, 2, 300, 64)
    q = rand((1, 2, 16, 64), torch.bfloat16, 6, scale=2.0)
    assert_scores_close(sim.window_scores(q, k, None, "mean", None), q, k.contiguous())


def test_window_scores_plan_host_logic():
    """The launch plan itself: shared memory within the device's opt-in limit, a row block no
    bigger than needed, enough CTAs to fill the GPU when there are keys enough."""
    for D, G, w in [(64, 1, 32), (128, 4, 32), (128, 8, 32), (256, 2, 16), (65, 3, 40)]:
        for smem in (A100_SMEM, H100_SMEM):
            for es in (2, 4):
                p = sim.window_scores_plan(1, 8, 32768, w, D, G, es, 132, smem)
                assert p["ok"] == 1
                assert p["stats_smem"] <= smem and p["votes_smem"] <= smem
                assert p["rows"] % 16 == 0 and 16 <= p["rows"] <= 128
                if es == 2 and smem == H100_SMEM:  # everything fits: the whole group, up to 128 rows
                    assert p["rows"] == min(128, -(-G * w // 16) * 16)
                assert p["stats_ctas"] >= 132 and p["votes_ctas"] >= 132
                assert p["async_rows"] == int((D * es) % 16 == 0)
                assert p["resident"] == int(es == 2 and p["rows"] == 128 and -(-D // 16) * 16 <= 128)
    assert sim.window_scores_plan(1, 8, 1024, 32, 4096, 1, 4, 132, 48 * 1024)["ok"] == 0


# ---------------------------------------------------------------- pool_scores
@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 3, 7, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool(pooling, kernel_size, dtype):
    s = rand((3, 2, 301), dtype, kernel_size).abs()
    pad = torch.tensor([0, 7, 301])
    out = both_orders(lambda: sim.pool_scores(s, kernel_size, pooling, pad))
    want = ref.pool_scores(s, kernel_size, pooling, pad)
    if pooling == "max":
        assert torch.equal(out, want)
    else:
        torch.testing.assert_close(out, want)


# ---------------------------------------------------------------- select_topk
@pytest.mark.parametrize("N,k", [(1, 1), (97, 1), (97, 97), (1025, 500), (4099, 2016), (20000, 4064), (9000, 9000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk(N, k, dtype):
    """Rows of 9000+ positions on a 132-SM plan take the sliced path (several CTAs per row)."""
    s = rand((2, 3, N), dtype, N + k)
    out = both_orders(lambda: sim.select_topk(s, k))
    assert torch.equal(out, ref.select_topk(s, k))


@pytest.mark.parametrize("sm_count", [1, 132])
def test_topk_sliced_plateaus(sm_count):
    """Ties across slice boundaries: equal scores taken in position order over all slices."""
    sim.configure("forward", 2, sm_count, H100_SMEM)
    s = torch.zeros(1, 2, 20000)
    s[0, 0, 5000:15000:3] = 1.0
    s[0, 1, ::2] = float("nan")
    for k in (1, 3000, 3334, 3335, 9999, 10000, 10001, 20000):
        assert torch.equal(sim.select_topk(s, k), ref.select_topk(s, k)), k


def test_topk_ties_nan_inf_zeros():
    nan, inf = float("nan"), float("inf")
    row = [nan, -inf, 0.0, -0.0, 1.0, 1.0, nan, -inf, -0.0, 0.0, 3.0, -inf]
    s = torch.tensor([[row, list(reversed(row))]])
    for k in range(0, len(row) + 1):
        assert torch.equal(sim.select_topk(s, k), ref.select_topk(s, k)), k
    plateau = torch.zeros(1, 2, 3000)
    plateau[0, 1, ::7] = 1.0
    for k in (1, 1000, 2999, 3000):
        assert torch.equal(sim.select_topk(plateau, k), ref.select_topk(plateau, k))


# ---------------------------------------------------------------- compact
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,offset", [(64, 0), (64, 1), (65, 0), (128, 3)])
def test_compact_into_views(dtype, D, offset):
    """Into views of bigger buffers at odd offsets (the scalar path) and aligned ones (16-byte
    copies)."""
    B, H, L, w, k = 2, 3, 257, 16, 40
    keys, values = rand((B, H, L, D), dtype, 1), rand((B, H, L, D), dtype, 2)
    idx = torch.stack([torch.randperm(L - w, generator=torch.Generator().manual_seed(i))[:k].sort().values
                       for i in range(B * H)]).view(B, H, k)
    big_k = torch.full((B, H, k + w + 5, D + offset), float("nan"), dtype=dtype)
    big_v = torch.full_like(big_k, float("nan"))
    ko, vo = big_k[:, :, 2 : 2 + k + w, offset:], big_v[:, :, 2 : 2 + k + w, offset:]
    sim.compact_into(keys, values, idx, w, ko, vo)
    want_k, want_v = ref.compact(keys, values, idx, w)
    assert torch.equal(ko, want_k) and torch.equal(vo, want_v)
    assert big_k[:, :, :2].isnan().all() and big_k[:, :, 2 + k + w :].isnan().all(), "wrote outside the view"
    if offset:
        assert big_k[..., :offset].isnan().all()


# ---------------------------------------------------------------- the fused path
@pytest.mark.parametrize("dtype,softcap", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, 5.0)])
def test_fused_selection_matches_reference(dtype, softcap):
    """Scores -> pool -> top-k -> compact on the simulated kernels keeps exactly what the float64
    reference keeps (the scores are well separated at this size), with and without a cap."""
    B, Hq, Hkv, w, L, D, budget = 1, 4, 2, 16, 400, 64, 96
    q, k, v = rand((B, Hq, w, D), dtype, 7, scale=3.0), rand((B, Hkv, L, D), dtype, 8), rand((B, Hkv, L, D), dtype, 9)
    scores = sim.window_scores(q, k, None, "mean", None, softcap)
    pooled = sim.pool_scores(scores, 7, "max", None)
    idx = sim.select_topk(pooled, budget - w)
    ko = torch.empty(B, Hkv, budget, D, dtype=dtype)
    vo = torch.empty_like(ko)
    sim.compact_into(k, v, idx, w, ko, vo)
    want_k, want_v, want_pos = ref.snapkv_compress(q, k, v, budget, 7, "max", softcap=softcap)
    assert torch.equal(idx, want_pos[..., : budget - w])
    assert torch.equal(ko, want_k) and torch.equal(vo, want_v)


# ---------------------------------------------------------------- the simulator catches bugs
@pytest.mark.parametrize("what,message", [
    ("divergent_barrier", "__syncthreads not reached by every thread"),
    ("shfl_outside_mask", "not in the mask"),
    ("partial_warp_collective", "deadlock"),
    ("wmma_mapping", "wmma fragment is not row-mapped"),
    ("wmma_unaligned", "not 256-bit aligned"),
])
def test_simulator_reports(what, message):
    with pytest.raises(RuntimeError, match=message) as e:
        sim.misbehave(what)
    assert what in str(e.value), "the report names the kernel"


def test_simulator_warp_ops_semantics():
    """Votes and shuffles as CUDA defines them, including partial masks and widths."""
    r = sim.warp_ops()
    for t in range(64):
        lane, base = t % 32, t - t % 32
        if lane < 16:
            assert r[t, 0] == sum(1 << l for l in range(16) if l % 3 == 0)
        assert r[t, 1] == int(t >= 32)  # thread 40 is in the second warp
        if lane % 2 == 1:
            assert r[t, 2] == int(t < 32)  # lane 31 of the second warp votes false
        assert r[t, 3] == (t - 3 if lane >= 3 else t)
        seg = lane // 16 * 16
        assert r[t, 4] == (t + 5 if lane + 5 < seg + 16 else t)
        assert r[t, 5] == base + 7


def test_simulator_smem_bounds_under_asan():
    """Reading past the launch's dynamic shared memory is an AddressSanitizer report."""
    code = f"import sys; sys.path.insert(0, {HERE!r}); import simbuild; simbuild.load().misbehave('smem_overflow')"
    r = subprocess.run([sys.executable, "-c", code], env=simbuild.sanitizer_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0
    assert "heap-buffer-overflow" in r.stderr, r.stderr[-2000:]


def test_simulator_is_sanitized():
    assert sim.sanitized()


# ---------------------------------------------------------------- ragged_attention
# (B, H_q, H_kv, n, D, lengths, dtype, softcap, row_stride, offset, sm_count): head dims
# 64/65/80/128/256, groups 1/3/4/8, 1/3/17 new tokens, lengths from n to 5000 differing per head,
# unused rows between segments, 16-byte (vector) and unaligned (scalar) rows, tiles prefetched
# through registers (fp32 D 64, fp16 D 64/128) and 16-byte tiles loaded in place (bf16 D 80/256,
# fp32 D 256: packs that do not divide the CTA or more than a thread holds), one CTA per segment
# (sm_count 1) and several (132 SMs), several row blocks (G * n = 68 > 32), soft-cap on and off.
RA_CASES = [
    (1, 3, 3, 1, 64, [[1, 700, 33]], torch.float32, None, None, 0, 132),
    (2, 8, 2, 3, 80, [[3, 300], [129, 50]], torch.bfloat16, 30.0, None, 0, 1),
    (1, 4, 1, 17, 128, [[5000]], torch.float16, None, None, 0, 132),
    (1, 8, 1, 1, 256, [[1000]], torch.bfloat16, 50.0, None, 0, 8),
    (1, 3, 1, 1, 65, [[77]], torch.float32, None, None, 0, 132),
    (2, 6, 2, 1, 64, [[40, 2000], [1, 9]], torch.bfloat16, None, 72, 1, 132),
    (1, 4, 4, 3, 64, [[3, 64, 65, 200]], torch.float16, 5.0, 72, 0, 1),
    (1, 2, 1, 1, 256, [[300]], torch.float32, None, None, 0, 132),
]


@pytest.mark.parametrize("B,Hq,Hkv,n,D,lengths,dtype,softcap,row_stride,offset,sm_count", RA_CASES)
def test_ragged_attention(B, Hq, Hkv, n, D, lengths, dtype, softcap, row_stride, offset, sm_count):
    from conftest import assert_attention_close, ragged_store

    g = torch.Generator().manual_seed(B * 1000 + D + n)
    k, v, starts, lens = ragged_store(lengths, D, dtype, "cpu", g, row_stride=row_stride, offset=offset)
    q = (torch.randn((B, Hq, n, D), generator=g) * 2).to(dtype)
    scale = D ** -0.5

    sim_order = lambda order: (sim.configure(order, 2, sm_count, H100_SMEM),
                               sim.ragged_attention(q, k, v, starts, lens, scale, softcap))[1]
    a, b = sim_order("forward"), sim_order("reverse")
    assert torch.equal(a, b), "forward and reverse thread orders disagree"
    assert_attention_close(a, q, k, v, starts, lens, scale, softcap)


def test_ragged_attention_plans():
    """One CTA per segment with few segments on one SM; splits on a big GPU; row blocks when
    G * n exceeds the CTA's rows; a smaller row block when shared memory is short."""
    one = sim.ragged_attention_plan(1, 8, 4, 1, 128, 4096, 1, H100_SMEM)
    assert one["ok"] and one["splits"] == 1 and one["rows"] == 4 and one["row_blocks"] == 1
    many = sim.ragged_attention_plan(1, 8, 4, 1, 128, 4096, 132, H100_SMEM)
    assert many["splits"] > 8 and many["tiles_per_split"] >= 4
    blocks = sim.ragged_attention_plan(1, 1, 8, 17, 64, 100, 132, H100_SMEM)
    assert blocks["rows"] == 32 and blocks["row_blocks"] == 5
    small = sim.ragged_attention_plan(1, 1, 8, 17, 128, 100, 132, 48 * 1024)
    assert small["ok"] and small["rows"] < 32 and small["smem"] <= 48 * 1024
    # D = 256 needs 65 KB for its fp32 key and value tiles alone: refused (the op says so).
    assert sim.ragged_attention_plan(1, 1, 8, 1, 256, 100, 132, 48 * 1024)["ok"] == 0
