"""pool_scores against F.max_pool1d / F.avg_pool1d, and select_topk judged by what it promises:
the k best positions (every selected one at least as good as every other), in position order,
ties toward the lower position."""
import pytest
import torch

from snapkv_ext import ops, reference as ref

from conftest import randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 13])
@pytest.mark.parametrize("length", [1, 17, 97, 1025, 4099])
def test_pool_matches_torch(device, gen, pooling, kernel_size, length):
    s = randn((2, 3, length), torch.float32, device, gen).abs()
    out = ops.pool_scores(s, kernel_size, pooling)
    want = ref.pool_scores(s.cpu(), kernel_size, pooling)
    assert out.shape == s.shape and out.dtype == s.dtype
    if pooling == "max":
        assert torch.equal(out.cpu(), want)
    else:
        torch.testing.assert_close(out.cpu(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_dtypes_and_padding(device, gen, dtype):
    s = randn((3, 2, 60), dtype, device, gen).abs()
    pad = torch.tensor([0, 5, 60], device=device)
    out = ops.pool_scores(s, 7, "max", pad).cpu()
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.pool_scores(s.cpu(), 7, "max", pad.cpu()))
    assert torch.isinf(out[1, :, :5]).all() and (out[1, :, :5] < 0).all()
    assert torch.isinf(out[2]).all()
    assert torch.isfinite(out[1, :, 5:]).all()


def check_topk(scores, idx, k):
    """idx [B, H, k]: sorted, distinct, and every selected score >= every unselected score,
    with ties resolved toward the lower position."""
    # NaN ranks below everything, -inf included: map it below -inf for the comparisons.
    s = scores.double().cpu()
    s = torch.where(s.isnan(), torch.full_like(s, -float("inf")), s)
    nan = scores.cpu().isnan()
    idx = idx.cpu()
    assert idx.dtype == torch.int64 and idx.shape == (*s.shape[:2], k)
    if k == 0:
        return
    assert (idx[..., 1:] > idx[..., :-1]).all(), "indices must be strictly increasing (sorted, distinct)"
    assert (idx >= 0).all() and (idx < s.shape[2]).all()
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(2, idx, True)
    worst_chosen = s.masked_fill(~chosen, float("inf")).amin(dim=2)
    best_other = s.masked_fill(chosen, float("-inf")).amax(dim=2)
    assert (worst_chosen >= best_other).all()
    # A NaN is chosen only when every non-NaN position is.
    chosen_nan = (chosen & nan).any(dim=2)
    assert (~chosen_nan | (chosen | nan).all(dim=2)).all(), "NaN must rank below -inf"
    # Ties: an unselected position equal to the worst selected one must come after every
    # selected position of that value.
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            t = worst_chosen[b, h]
            tied_out = ((s[b, h] == t) & ~chosen[b, h]).nonzero().flatten()
            tied_in = ((s[b, h] == t) & chosen[b, h]).nonzero().flatten()
            if len(tied_out) and len(tied_in):
                assert tied_in.max() < tied_out.min(), "ties must go to the lower position"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length,k", [(1, 1), (97, 1), (97, 50), (97, 97), (1025, 500), (4099, 2016), (20000, 4064)])
def test_topk_selects_best(device, gen, dtype, length, k):
    s = randn((2, 3, length), dtype, device, gen)
    idx = ops.select_topk(s, k)
    check_topk(s, idx, k)
    assert torch.equal(idx.cpu(), ref.select_topk(s.cpu(), k))


def test_topk_ties_and_plateaus(device):
    """Max pooling makes plateaus of equal scores; ties must go to the lower positions."""
    s = torch.tensor([[[1.0, 3.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0]]], device=device)
    assert ops.select_topk(s, 3).cpu().tolist() == [[[1, 2, 3]]]
    assert ops.select_topk(s, 5).cpu().tolist() == [[[1, 2, 3, 5, 7]]]
    z = torch.zeros(1, 2, 3000, device=device)
    assert torch.equal(ops.select_topk(z, 1000).cpu(), torch.arange(1000).expand(1, 2, 1000))


def test_topk_inf_and_nan(device):
    """-inf (masked padding) ranks below every finite score; NaN below everything."""
    s = torch.tensor([[[float("nan"), float("-inf"), -5.0, float("inf"), -1e30, float("-inf")]]], device=device)
    assert ops.select_topk(s, 3).cpu().tolist() == [[[2, 3, 4]]]
    assert ops.select_topk(s, 5).cpu().tolist() == [[[1, 2, 3, 4, 5]]]
    assert ops.select_topk(s, 6).cpu().tolist() == [[[0, 1, 2, 3, 4, 5]]]


def test_topk_negative_zero(device):
    """+0 and -0 are equal scores: the tie goes to the lower position, whichever sign it has."""
    for s in ([0.0, -0.0, -1.0, 1.0], [-0.0, 0.0, -1.0, 1.0]):
        t = torch.tensor([[s]], device=device)
        assert ops.select_topk(t, 2).cpu().tolist() == [[[0, 3]]]
        assert ref.select_topk(t.cpu(), 2).tolist() == [[[0, 3]]]


def test_topk_nan_below_neg_inf(device):
    """NaN ranks below -inf in the kernels and in the reference alike."""
    t = torch.tensor([[[float("nan"), float("-inf"), 1.0, float("nan"), float("-inf")]]], device=device)
    for k, want in [(2, [1, 2]), (3, [1, 2, 4]), (4, [0, 1, 2, 4])]:
        assert ops.select_topk(t, k).cpu().tolist() == [[want]]
        assert ref.select_topk(t.cpu(), k).tolist() == [[want]]


def test_topk_zero_k(device, gen):
    s = randn((2, 2, 10), torch.float32, device, gen)
    assert ops.select_topk(s, 0).shape == (2, 2, 0)
