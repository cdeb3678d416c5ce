"""ragged_attention against the float64 reference on every device: GQA groups 1/3/4/8, head dims
64/80/128 and odd ones, 1/3/17 new tokens, per-head lengths from n up, unused rows between
segments, row strides > D, unaligned rows, soft-capping, and non-contiguous queries."""
import pytest
import torch
import torch.nn.functional as F

from snapkv_ext import ops

from conftest import assert_attention_close, randn, ragged_store

# (B, H_q, H_kv, n, D, lengths per (b, h), dtype, softcap)
CASES = [
    (1, 9, 3, 1, 64, [[1, 300, 97]], torch.float32, None),
    (2, 8, 2, 3, 80, [[3, 70], [129, 5]], torch.bfloat16, None),
    (1, 4, 4, 17, 65, [[17, 40, 200, 18]], torch.float16, 30.0),
    (3, 3, 1, 1, 128, [[1], [600], [33]], torch.bfloat16, 50.0),
    (1, 8, 1, 2, 96, [[1025]], torch.float32, 5.0),
    (2, 2, 2, 1, 1, [[4, 9], [1, 2]], torch.float32, None),
]


@pytest.mark.parametrize("B,Hq,Hkv,n,D,lengths,dtype,softcap", CASES)
def test_ragged_attention(device, gen, B, Hq, Hkv, n, D, lengths, dtype, softcap):
    k, v, starts, lens = ragged_store(lengths, D, dtype, device, gen)
    q = randn((B, Hq, n, D), dtype, device, gen, scale=2.0)
    scale = D ** -0.5
    out = ops.ragged_attention(q, k, v, starts, lens, scale, softcap)
    assert_attention_close(out, q, k, v, starts, lens, scale, softcap)


@pytest.mark.parametrize("row_stride,offset", [(72, 0), (64, 1), (67, 1)])
def test_strided_and_unaligned_store(device, gen, row_stride, offset):
    k, v, starts, lens = ragged_store([[5, 130], [64, 1]], 64, torch.bfloat16, device, gen, row_stride=row_stride,
                                      offset=offset)
    q = randn((2, 4, 1, 64), torch.bfloat16, device, gen)
    assert_attention_close(ops.ragged_attention(q, k, v, starts, lens, 0.125), q, k, v, starts, lens, 0.125)


def test_non_contiguous_q(device, gen):
    k, v, starts, lens = ragged_store([[40, 7, 90]], 64, torch.float32, device, gen)
    # [1, 6, 3, 64] with the head and token strides swapped and every other row skipped.
    q = randn((1, 3, 6, 2, 64), torch.float32, device, gen)[..., 1, :].transpose(1, 2)
    assert not q.is_contiguous()
    out = ops.ragged_attention(q, k, v, starts, lens, 0.1)
    assert_attention_close(out, q, k, v, starts, lens, 0.1)
    torch.testing.assert_close(out, ops.ragged_attention(q.contiguous(), k, v, starts, lens, 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_sdpa_on_dense_cache(device, gen, dtype):
    """All heads the same length T: the store is a dense [B, H_kv, T, D] cache, and the op is SDPA
    (causal among the n new tokens, every cache row valid: no padding)."""
    B, Hq, Hkv, T, D, n = 2, 6, 2, 77, 64, 3
    kd = randn((B, Hkv, T, D), dtype, device, gen)
    vd = randn((B, Hkv, T, D), dtype, device, gen)
    q = randn((B, Hq, n, D), dtype, device, gen)
    starts = (torch.arange(B * Hkv, device=device) * T).view(B, Hkv)
    lens = torch.full((B, Hkv), T, device=device)
    out = ops.ragged_attention(q, kd.reshape(-1, D), vd.reshape(-1, D), starts, lens, D ** -0.5)
    mask = torch.ones(n, T, dtype=torch.bool, device=device).tril(T - n)
    want = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), attn_mask=mask, enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


def test_every_segment_row_is_valid(device, gen):
    """No padding semantics: the first segment row takes part (a huge value there shows), rows
    outside the segment do not (ragged_store fills them with 1e4)."""
    k, v, starts, lens = ragged_store([[3, 4]], 16, torch.float32, device, gen)
    k[starts[0, 0]] = 0.0
    v[starts[0, 0]] = 1000.0
    q = torch.zeros(1, 2, 1, 16, device=device)
    out = ops.ragged_attention(q, k, v, starts, lens, 1.0)
    # Uniform softmax over the 3 rows of head 0: the 1000 row contributes a third.
    want = (1000.0 + v[starts[0, 0] + 1 : starts[0, 0] + 3].sum(0)) / 3
    torch.testing.assert_close(out[0, 0, 0], want)
    assert out.abs().max() < 1e3
