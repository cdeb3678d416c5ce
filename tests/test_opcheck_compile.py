"""The ops are proper dispatcher ops: opcheck (schema, fake tensors, autograd registration)
passes on a small case of each, and a function using them compiles with fullgraph=True."""
import pytest
import torch

import snapkv_ext  # noqa: F401
from snapkv_ext import ops

from conftest import needs_gpu, randn


def small_case(device, gen):
    q = randn((2, 4, 8, 64), torch.float32, device, gen)
    k = randn((2, 2, 40, 64), torch.float32, device, gen)
    v = randn((2, 2, 40, 64), torch.float32, device, gen)
    pad = torch.tensor([0, 3], device=device)
    s = randn((2, 2, 32), torch.float32, device, gen)
    idx = torch.arange(0, 20, 2, device=device).expand(2, 2, 10).contiguous()
    return q, k, v, pad, s, idx


def test_opcheck(device, gen):
    q, k, v, pad, s, idx = small_case(device, gen)
    snap = torch.ops.snapkv
    ko, vo = torch.empty(2, 2, 18, 64, device=device), torch.empty(2, 2, 18, 64, device=device)
    for op, args in [
        (snap.window_scores.default, (q, k, pad, "mean", None)),
        (snap.window_scores.default, (q, k, None, "max", 0.3)),
        (snap.window_scores.default, (q, k, pad, "mean", None, 5.0)),
        (snap.pool_scores.default, (s, 5, "max", pad)),
        (snap.pool_scores.default, (s, 3, "avg", None)),
        (snap.select_topk.default, (s, 7)),
        (snap.compact.default, (k, v, idx, 8)),
        (snap.compact_into.default, (k, v, idx, 8, ko, vo)),
        (snap.snapkv_compress.default, (q, k, v, 16, 7, "max", "mean", pad, None)),
        (snap.snapkv_compress.default, (q, k, v, 64, 7, "max", "mean", None, None)),
        (snap.snapkv_compress.default, (q, k, v, 16, 5, "avg", "sum", pad, 0.2, 5.0)),
        (snap.snapkv_compress_into.default, (q, k, v, 16, ko[:, :, :16], vo[:, :, 2:], 7, "max", "mean", pad, None)),
        (snap.snapkv_compress_into.default, (q, k, v, 64, ko.new_empty(2, 2, 40, 64), vo.new_empty(2, 2, 40, 64),
                                             5, "avg", "max", None, None)),
        (snap.snapkv_compress_into.default, (q, k, v, 16, ko[:, :, :16], vo[:, :, 2:], 7, "max", "mean", pad, None,
                                             30.0)),
        (snap.ragged_attention.default, (q[:, :, :3], k.reshape(-1, 64), v.reshape(-1, 64),
                                         torch.tensor([[0, 45], [90, 120]], device=device),
                                         torch.tensor([[40, 5], [3, 39]], device=device), 0.125, None)),
        (snap.ragged_attention.default, (q[:, :, :1], k.reshape(-1, 64), v.reshape(-1, 64),
                                         torch.tensor([[0, 40], [80, 120]], device=device),
                                         torch.tensor([[40, 1], [30, 40]], device=device), 0.125, 20.0)),
    ]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device, gen):
    q, k, v, pad, _, _ = small_case(device, gen)

    def step(q, k, v, pad):
        s = ops.pool_scores(ops.window_scores(q, k, pad), 7, "max", pad)
        idx = ops.select_topk(s, 8)
        ck, cv = ops.compact(k, v, idx, 8)
        fk, fv, pos = ops.snapkv_compress(q, k, v, 16, 7, "max", "mean", pad, softcap=5.0)
        ik, iv = torch.zeros_like(fk), torch.zeros_like(fv)
        ipos = ops.snapkv_compress_into(q, k, v, 16, ik, iv, 7, "max", "mean", pad)
        return ck + 1, cv, fk, fv, pos, ik, iv, ipos

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, pad), step(q, k, v, pad)):
        assert torch.equal(got, want)


@needs_gpu
def test_cuda_matches_cpu(gen):
    """The CUDA kernels and the CPU kernels keep the same entries (same selection rules)."""
    q = randn((2, 8, 32, 128), torch.bfloat16, "cpu", gen)
    k = randn((2, 2, 3000, 128), torch.bfloat16, "cpu", gen, scale=2.0)
    pad = torch.tensor([0, 500])
    s_cpu = ops.window_scores(q, k, pad)
    s_gpu = ops.window_scores(q.cuda(), k.cuda(), pad.cuda()).cpu()
    torch.testing.assert_close(s_gpu, s_cpu, rtol=1e-4, atol=1e-7)
    s_capped = ops.window_scores(q.cuda(), k.cuda(), pad.cuda(), softcap=5.0).cpu()
    torch.testing.assert_close(s_capped, ops.window_scores(q, k, pad, softcap=5.0), rtol=1e-4, atol=1e-7)
    p = ops.pool_scores(s_cpu, 7, "max", pad)
    assert torch.equal(ops.pool_scores(s_cpu.cuda(), 7, "max", pad.cuda()).cpu(), p)
    assert torch.equal(ops.select_topk(p.cuda(), 1000).cpu(), ops.select_topk(p, 1000))


def test_fakes_on_meta_tensors():
    """Good calls on meta tensors give the kernels' output shapes and dtypes."""
    q, k, v, pad, s, idx = (x.to("meta") for x in small_case("cpu", torch.Generator().manual_seed(0)))
    assert ops.window_scores(q, k, pad, softcap=5.0).shape == (2, 2, 32)
    assert ops.window_scores(q, k).dtype == torch.float32
    assert ops.pool_scores(s, 5, "avg", pad).shape == (2, 2, 32)
    assert ops.select_topk(s, 7).shape == (2, 2, 7) and ops.select_topk(s, 0).dtype == torch.int64
    ck, cv = ops.compact(k, v, idx, 8)
    assert ck.shape == cv.shape == (2, 2, 18, 64)
    ops.compact_into(k, v, idx, 8, torch.empty(2, 2, 18, 64, device="meta"), torch.empty(2, 18, 2, 64, device="meta")
                     .transpose(1, 2))
    fk, fv, pos = ops.snapkv_compress(q, k, v, 16, softcap=30.0)
    assert fk.shape == fv.shape == (2, 2, 16, 64) and pos.shape == (2, 2, 16) and pos.dtype == torch.int64
    assert ops.snapkv_compress(q.half(), k.half(), v.half(), 64)[0].shape == (2, 2, 40, 64)  # L <= capacity
    out = torch.empty(2, 2, 16, 64, device="meta")
    assert ops.snapkv_compress_into(q, k, v, 16, out, out.clone(), pad_lengths=pad).shape == (2, 2, 16)


def test_fake_rejects_wrong_shapes(gen):
    """Under FakeTensorMode (how torch.compile traces) a wrong shape fails in the fake, naming the
    argument, before any kernel runs; a compiled function fails the same way while tracing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, pad, s, idx = small_case("cpu", gen)
    with FakeTensorMode() as mode:
        fq, fk, fv = mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v)
        assert ops.window_scores(fq, fk).shape == (2, 2, 32)
        with pytest.raises(RuntimeError, match="snapkv: H_q must be a multiple of H_kv"):
            ops.window_scores(fq[:, :3], fk)
        with pytest.raises(RuntimeError, match="snapkv: values must have the shape of keys"):
            ops.snapkv_compress(fq, fk, fv[:, :, :30], 16)
        with pytest.raises(RuntimeError, match=r"snapkv: keys_out must be \[B, H_kv, min\(L, max_capacity_prompt\)"):
            ops.snapkv_compress_into(fq, fk, fv, 16, fk[:, :, :15], fv[:, :, :16])

    def step(q, k):
        return ops.window_scores(q, k[:, :, :, :32])  # head dims 64 and 32

    with pytest.raises(Exception, match="snapkv: q_window and keys must have the same head dim"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(q, k)
