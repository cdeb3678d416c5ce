"""The fused snapkv_compress path: equals the composition of the single ops, keeps what the
float64 reference pipeline would keep, returns the prompt unchanged when it fits, and treats a
left-padded batch row exactly like that row alone."""
import pytest
import torch

from snapkv_ext import ops, reference as ref

from conftest import needs_gpu, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, H_q, H_kv, L, D, w, dtype, device, gen):
    q = randn((B, H_q, w, D), dtype, device, gen)
    k = randn((B, H_kv, L, D), dtype, device, gen, scale=2.0)
    v = randn((B, H_kv, L, D), dtype, device, gen)
    return q, k, v


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_equals_composition(device, gen, dtype, pooling):
    q, k, v = make(2, 8, 2, 500, 64, 16, dtype, device, gen)
    C, ks = 128, 7
    pad = torch.tensor([0, 40], device=device)
    ko, vo, pos = ops.snapkv_compress(q, k, v, C, ks, pooling, "mean", pad)
    s = ops.pool_scores(ops.window_scores(q, k, pad), ks, pooling, pad)
    idx = ops.select_topk(s, C - 16)
    kr, vr = ops.compact(k, v, idx, 16)
    assert torch.equal(ko, kr) and torch.equal(vo, vr)
    assert torch.equal(pos[..., : C - 16], idx)
    assert torch.equal(pos[..., C - 16 :].cpu(), torch.arange(500 - 16, 500).expand(2, 2, 16))


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("pooling,kernel_size", [("max", 7), ("max", 5), ("avg", 3), ("max", 1)])
def test_selection_matches_reference(device, gen, group, pooling, kernel_size):
    """Every kept prefix position scores (by the float64 reference pipeline) at least as high
    as every dropped one, up to float tolerance; kept rows are the keys/values at those
    positions."""
    B, H_kv, L, D, w, C = 1, 2, 1025, 64, 32, 256
    q, k, v = make(B, H_kv * group, H_kv, L, D, w, torch.float32, device, gen)
    ko, vo, pos = ops.snapkv_compress(q, k, v, C, kernel_size, pooling)
    assert ko.shape == (B, H_kv, C, D) and pos.shape == (B, H_kv, C)
    s = ref.pool_scores(ref.window_scores(q.cpu(), k.cpu()).double(), kernel_size, pooling)
    kept = pos[..., : C - w].cpu()
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(2, kept, True)
    worst = s.masked_fill(~chosen, float("inf")).amin(2)
    best_dropped = s.masked_fill(chosen, float("-inf")).amax(2)
    assert (worst >= best_dropped - 1e-6 * s.amax(2)).all()
    idx = pos[..., :, None].expand(-1, -1, -1, D)
    assert torch.equal(ko, k.gather(2, idx)) and torch.equal(vo, v.gather(2, idx))


def test_prompt_within_budget_is_unchanged(device, gen):
    q, k, v = make(2, 4, 2, 100, 64, 16, torch.bfloat16, device, gen)
    for C in (100, 4096):
        ko, vo, pos = ops.snapkv_compress(q, k, v, C)
        assert torch.equal(ko, k) and torch.equal(vo, v)
        assert torch.equal(pos.cpu(), torch.arange(100).expand(2, 2, 100))


def test_reference_pipeline_agrees(device, gen):
    q, k, v = make(1, 4, 4, 300, 80, 8, torch.float32, device, gen)
    got = ops.snapkv_compress(q, k, v, 64, 5, "max", "max")
    want = ref.snapkv_compress(q.cpu(), k.cpu(), v.cpu(), 64, 5, "max", "max")
    # Random data has no near-ties at this size: the kept sets agree exactly.
    for g, w_ in zip(got, want):
        assert torch.equal(g.cpu(), w_)


@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap_selection_matches_reference(device, gen, softcap):
    """With Gemma 2's logit cap the fused path keeps what the float64 reference keeps, which is
    not what it keeps without the cap (queries large enough for the cap to matter)."""
    q = randn((2, 8, 16, 64), torch.float32, device, gen, scale=4.0)
    k = randn((2, 2, 600, 64), torch.float32, device, gen, scale=2.0)
    v = randn((2, 2, 600, 64), torch.float32, device, gen)
    pad = torch.tensor([0, 90], device=device)
    got = ops.snapkv_compress(q, k, v, 128, 7, "max", "mean", pad, softcap=softcap)
    want = ref.snapkv_compress(q.cpu(), k.cpu(), v.cpu(), 128, 7, "max", "mean", pad.cpu(), softcap=softcap)
    for g, w_ in zip(got, want):
        assert torch.equal(g.cpu(), w_)
    assert not torch.equal(got[2], ops.snapkv_compress(q, k, v, 128, 7, "max", "mean", pad)[2])
    ko, vo = torch.empty_like(got[0]), torch.empty_like(got[1])
    pos = ops.snapkv_compress_into(q, k, v, 128, ko, vo, 7, "max", "mean", pad, None, softcap)
    assert torch.equal(pos, got[2]) and torch.equal(ko, got[0]) and torch.equal(vo, got[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_batch_rows_equal_rows_alone(device, gen, dtype):
    """Left-padded batch: padding is never kept while a row has enough real positions, and
    each row keeps what it keeps when run alone."""
    L, w, C, D = 400, 16, 96, 64
    q, k, v = make(3, 6, 2, L, D, w, dtype, device, gen)
    pad = torch.tensor([0, 57, 230], device=device)
    ko, vo, pos = ops.snapkv_compress(q, k, v, C, 7, "max", "mean", pad)
    for b in range(3):
        p = int(pad[b])
        assert (pos[b] >= p).all(), "padding must never be kept"
        a_k, a_v, a_pos = ops.snapkv_compress(q[b : b + 1], k[b : b + 1, :, p:], v[b : b + 1, :, p:], C, 7, "max")
        s_alone = ref.pool_scores(ref.window_scores(q[b : b + 1].cpu(), k[b : b + 1, :, p:].cpu()), 7, "max")
        # Same kept set as alone, up to near-ties of the alone scores.
        kept = pos[b : b + 1, :, : C - w].cpu() - p
        thresh = s_alone.gather(2, a_pos[..., : C - w].cpu()).amin(2, keepdim=True)
        assert (s_alone.gather(2, kept) >= thresh - 1e-5 * s_alone.amax()).all()
        same = torch.equal(pos[b : b + 1].cpu() - p, a_pos.cpu())
        if same:
            assert torch.equal(ko[b : b + 1], a_k) and torch.equal(vo[b : b + 1], a_v)


def test_short_padded_row_stays_left_padded(device, gen):
    """A row with fewer real prefix positions than the budget keeps all of them, after its
    lowest padded positions."""
    L, w, C = 200, 16, 96
    q, k, v = make(2, 4, 2, L, 64, w, torch.float32, device, gen)
    pad = torch.tensor([0, 150], device=device)  # row 1: 50 real tokens, 34 real prefix positions
    _, _, pos = ops.snapkv_compress(q, k, v, C, 7, "max", "mean", pad)
    row = pos[1, :, : C - w].cpu()
    n_pad = (C - w) - (L - w - 150)
    assert torch.equal(row[:, :n_pad], torch.arange(n_pad).expand(2, n_pad))
    assert torch.equal(row[:, n_pad:], torch.arange(150, L - w).expand(2, L - w - 150))


@pytest.mark.parametrize("L", [500, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compress_into_preallocated_buffer(device, gen, dtype, L):
    """snapkv_compress_into writes exactly what snapkv_compress returns into the front of a
    larger (strided) buffer, leaves the rest of it alone, and returns the same positions; also
    when the prompt fits (L <= capacity: a copy)."""
    q, k, v = make(2, 8, 2, L, 64, 16, dtype, device, gen)
    C = 128
    pad = torch.tensor([0, 40], device=device)
    ko, vo, pos = ops.snapkv_compress(q, k, v, C, 7, "max", "mean", pad)
    n = ko.shape[2]
    kbuf = torch.full((2, 2, C + 10, 64), 3.0, dtype=dtype, device=device)
    vbuf = torch.full((2, C + 10, 2, 64), 3.0, dtype=dtype, device=device).transpose(1, 2)  # strided
    got = ops.snapkv_compress_into(q, k, v, C, kbuf[:, :, :n], vbuf[:, :, :n], 7, "max", "mean", pad)
    assert torch.equal(got, pos)
    assert torch.equal(kbuf[:, :, :n], ko) and torch.equal(vbuf[:, :, :n], vo)
    assert (kbuf[:, :, n:] == 3).all() and (vbuf[:, :, n:] == 3).all()


@needs_gpu
def test_cuda_million_tokens_int64_offsets():
    """L = 2^20 + 3 with B * H_kv * L * D > 2^31 elements: every offset past 2^31 must be int64.
    Scores are checked per head against a float64 computation on the GPU; the fused path keeps
    what the op composition keeps; the last head's kept rows are the keys at the kept positions."""
    torch.manual_seed(0)
    B, H_q, H_kv, L, D, w, C = 1, 8, 8, (1 << 20) + 3, 256, 32, 4096
    assert B * H_kv * L * D > 2**31
    dev = torch.device("cuda")
    q = torch.randn(B, H_q, w, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, H_kv, L, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, H_kv, L, D, device=dev, dtype=torch.bfloat16)
    scores = ops.window_scores(q, k)
    assert scores.shape == (B, H_kv, L - w) and torch.isfinite(scores).all()
    for h in (0, H_kv - 1):  # the last head lives past element 2^31
        want = ref.window_scores(q[:, h : h + 1], k[:, h : h + 1])
        fp32 = ref.window_scores(q[:, h : h + 1], k[:, h : h + 1], dtype=torch.float32)
        err = (scores[:, h : h + 1] - want).abs().max().item()
        assert err <= 2 * (fp32 - want).abs().max().item() + 1e-6 * want.abs().max().item() + 1e-9
    ko, vo, pos = ops.snapkv_compress(q, k, v, C)
    idx = ops.select_topk(ops.pool_scores(scores, 7, "max"), C - w)
    assert torch.equal(pos[..., : C - w], idx)
    last = pos[0, -1]
    assert torch.equal(ko[0, -1], k[0, -1].index_select(0, last))
    assert torch.equal(vo[0, -1], v[0, -1].index_select(0, last))
