"""window_scores against the float64 reference, over dtypes, GQA ratios, head dims, lengths,
windows, group reductions and padded rows."""
import pytest
import torch

from snapkv_ext import ops, reference as ref

from conftest import assert_scores_close, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = [1, 3, 4, 8]
HEAD_DIMS = [64, 80, 96, 128, 256]
REDUCE = ["mean", "max", "sum"]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GQA)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_gqa_head_dims(device, gen, dtype, group, head_dim):
    B, H_kv, L, w = 2, 2, 97, 16
    q = randn((B, H_kv * group, w, head_dim), dtype, device, gen)
    k = randn((B, H_kv, L, head_dim), dtype, device, gen, scale=2.0)
    assert_scores_close(ops.window_scores(q, k), q, k)


@pytest.mark.parametrize("window", [1, 16, 32])
@pytest.mark.parametrize("length", ["w+1", 97, 1025, 4099])
def test_lengths_and_windows(device, gen, length, window):
    L = window + 1 if length == "w+1" else length
    q = randn((1, 4, window, 64), torch.float32, device, gen)
    k = randn((1, 2, L, 64), torch.float32, device, gen, scale=3.0)
    assert_scores_close(ops.window_scores(q, k), q, k)


@pytest.mark.parametrize("group_reduce", REDUCE)
def test_group_reduce(device, gen, group_reduce):
    q = randn((2, 8, 16, 64), torch.float32, device, gen)
    k = randn((2, 2, 300, 64), torch.float32, device, gen, scale=2.0)
    assert_scores_close(ops.window_scores(q, k, group_reduce=group_reduce), q, k, group_reduce=group_reduce)


def test_scores_are_a_distribution(device, gen):
    """With sum over one query head, prefix votes plus window votes of each query sum to 1, so
    the prefix votes lie in [0, 1] and sum to less than 1."""
    q = randn((1, 1, 8, 64), torch.float32, device, gen)
    k = randn((1, 1, 200, 64), torch.float32, device, gen)
    s = ops.window_scores(q, k, group_reduce="sum").cpu()
    assert (s >= 0).all() and (s <= 1).all()
    assert 0 < s.sum().item() < 1


def test_custom_scale(device, gen):
    q = randn((1, 4, 8, 64), torch.float32, device, gen)
    k = randn((1, 2, 100, 64), torch.float32, device, gen)
    out = ops.window_scores(q, k, scale=0.5).cpu()
    want = ref.window_scores(q.cpu(), k.cpu(), scale=0.5)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(out, ops.window_scores(q, k).cpu(), rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_rows(device, gen, dtype):
    B, L, w = 3, 150, 16
    q = randn((B, 6, w, 64), dtype, device, gen)
    k = randn((B, 2, L, 64), dtype, device, gen, scale=2.0)
    pad = torch.tensor([0, 37, L - w], device=device)
    out = ops.window_scores(q, k, pad)
    assert_scores_close(out, q, k, pad)
    out = out.cpu()
    for b in range(B):
        p = int(pad[b])
        assert (out[b, :, :p] == 0).all(), "padded positions must score 0"
        if p < L - w:
            # Each row scores as if it ran alone, without its padding.
            alone = ops.window_scores(q[b : b + 1], k[b : b + 1, :, p:]).cpu()
            torch.testing.assert_close(out[b : b + 1, :, p:], alone, rtol=1e-4, atol=1e-7)


def test_non_contiguous_inputs(device, gen):
    """A window sliced from all the queries and keys viewed through a transpose both work."""
    q_all = randn((1, 4, 50, 64), torch.float32, device, gen)
    k_t = randn((1, 120, 2, 64), torch.float32, device, gen).transpose(1, 2)
    q = q_all[:, :, -16:]
    assert not q.is_contiguous() and not k_t.is_contiguous()
    torch.testing.assert_close(ops.window_scores(q, k_t), ops.window_scores(q.contiguous(), k_t.contiguous()))


# ---- logit soft-capping (Gemma 2): softcap * tanh(logit / softcap) before the mask and softmax
# Queries of scale 4 against keys of scale 2 at D = 64 give logits of standard deviation ~8: a
# cap of 5 bends most of them, 50 only the tails.
SOFTCAPS = [5.0, 15.0, 50.0]


@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_dtypes_gqa(device, gen, dtype, group, softcap):
    B, H_kv, L, w, D = 2, 2, 301, 16, 64
    q = randn((B, H_kv * group, w, D), dtype, device, gen, scale=4.0)
    k = randn((B, H_kv, L, D), dtype, device, gen, scale=2.0)
    out = ops.window_scores(q, k, softcap=softcap)
    assert_scores_close(out, q, k, softcap=softcap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_padded_rows_and_scale(device, gen, dtype):
    """Padding, a head dim that is not a multiple of 16, an explicit scale and group max."""
    B, L, w, D = 3, 170, 16, 80
    q = randn((B, 6, w, D), dtype, device, gen, scale=4.0)
    k = randn((B, 2, L, D), dtype, device, gen, scale=2.0)
    pad = torch.tensor([0, 37, L - w], device=device)
    out = ops.window_scores(q, k, pad, "max", 0.2, 5.0)
    assert_scores_close(out, q, k, pad, "max", scale=0.2, softcap=5.0)
    assert (out[1, :, :37] == 0).all() and (out[2] == 0).all(), "padded positions must score 0"


@pytest.mark.parametrize("length", [97, 1025])
def test_softcap_lengths(device, gen, length):
    """Blocks of keys (the CPU kernel's 256) and the window's causal mask after the cap."""
    q = randn((1, 8, 32, 128), torch.float32, device, gen, scale=4.0)
    k = randn((1, 2, length, 128), torch.float32, device, gen, scale=2.0)
    assert_scores_close(ops.window_scores(q, k, softcap=5.0), q, k, softcap=5.0)


def test_softcap_changes_scores(device, gen):
    """A cap small against the logits changes the scores, and the selection, materially: the
    kernel must apply it (and not to the unscaled dot products, nor not at all)."""
    q = randn((1, 4, 16, 64), torch.float32, device, gen, scale=4.0)
    k = randn((1, 2, 400, 64), torch.float32, device, gen, scale=2.0)
    capped, plain = ops.window_scores(q, k, softcap=5.0).cpu(), ops.window_scores(q, k).cpu()
    torch.testing.assert_close(capped, ref.window_scores(q.cpu(), k.cpu(), softcap=5.0), rtol=1e-4, atol=1e-6)
    assert (capped - plain).abs().max() > 0.1 * plain.abs().max()
    top_capped, top_plain = ops.select_topk(capped, 64), ops.select_topk(plain, 64)
    assert not torch.equal(top_capped, top_plain)
    # The cap applies to the scaled logit. Capping the dot product and scaling after, 5 tanh(x / 5)
    # / 8 with x = q.k, is capping the scaled logit at 5 / 8: another function.
    cap_then_scale = ref.window_scores(q.cpu(), k.cpu(), softcap=5.0 / 8)
    assert (capped - cap_then_scale).abs().max() > 0.1 * capped.abs().max()
    # A cap far above every logit changes nothing beyond rounding.
    torch.testing.assert_close(ops.window_scores(q, k, softcap=1e4).cpu(), plain, rtol=1e-3, atol=1e-6)
