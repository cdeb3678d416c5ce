"""Selection policies (snapkv_ext.policies) against their float64 loop references."""
import pytest
import torch

from snapkv_ext import ops, policies, reference


@pytest.mark.parametrize("cap,w,n", [(1024, 32, 30), (64, 8, 3), (200, 16, 7), (40, 32, 24), (512, 32, 1)])
@pytest.mark.parametrize("beta", [20.0, 2.0])
def test_pyramid_capacities(cap, w, n, beta):
    got = policies.PyramidKV(beta).layer_capacities(cap, w, n)
    assert got == reference.policy_capacities("pyramidkv", cap, w, n, beta)
    assert sum(got) == n * cap, "same total as the uniform budget"
    assert all(c > w for c in got) or cap - w < beta, "every layer keeps more than its window"
    assert got == sorted(got, reverse=True), "lower layers keep more"
    if n > 1 and cap - w >= 2 * beta:
        assert got[0] > got[-1]
    assert policies.AdaPyramidKV(beta=beta).layer_capacities(cap, w, n) == got
    assert policies.SelectionPolicy().layer_capacities(cap, w, n) == [cap] * n
    assert policies.AdaKV().layer_capacities(cap, w, n) == [cap] * n


def _case(seed, B=3, H_q=4, H_kv=2, L=301, D=16, w=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_q, w, D, generator=g)
    k = torch.randn(B, H_kv, L, D, generator=g) * 1.5
    return q, k


def _policy_keep(name, q, k, cap, pad, kernel_size, pooling, native, floor=0.2):
    """The policy module's selection over SnapKV's pooled votes (reference or native ops)."""
    L, w = k.shape[2], q.shape[2]
    P = L - w
    clamped = None if pad is None else pad.clamp(max=P)
    mod = ops if native else reference
    s = mod.pool_scores(mod.window_scores(q, k, clamped, "mean"), kernel_size, pooling, clamped)
    pol = policies.resolve(name) if name != "adakv" else policies.AdaKV(floor)
    B, H = s.shape[:2]
    valid = policies.valid_prefix(pad, B, H, P, s.device)
    counts = policies.check_counts(pol, pol.head_counts(s, cap - w, valid), cap - w, valid, (B, H))
    return policies.keep_mask(s, counts, pad, w), counts


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "ada-pyramidkv"])
@pytest.mark.parametrize("pad", [None, [0, 57, 299]], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("kernel_size,pooling", [(7, "max"), (1, "max"), (5, "avg")])
def test_selection_equals_reference(name, pad, kernel_size, pooling):
    q, k = _case(seed=len(name) + kernel_size)
    pad_t = None if pad is None else torch.tensor(pad)
    cap = 72
    want = reference.policy_keep(q, k, cap, name, 0.2, kernel_size, pooling, "mean", pad_t)
    got, counts = _policy_keep(name, q, k, cap, pad_t, kernel_size, pooling, native=False)
    assert torch.equal(got, want)
    L, w = k.shape[2], q.shape[2]
    for b in range(k.shape[0]):
        p = 0 if pad is None else pad[b]
        assert not got[b, :, :p].any(), "left padding is never kept"
        assert got[b, :, max(p, L - w):].all(), "the window is always kept"
        assert int(counts[b].sum()) == k.shape[1] * min(cap - w, max(L - w - p, 0))
    native, _ = _policy_keep(name, q, k, cap, pad_t, kernel_size, pooling, native=True)
    assert torch.equal(native, want), "the native scoring ops select the same"


def test_adakv_moves_budget_between_heads():
    # head 0's votes sit on a few positions, head 1's are spread: AdaKV gives head 1 more
    B, H, P = 1, 2, 100
    s = torch.full((B, H, P), 1e-4)
    s[0, 0, :5] = 0.2
    s[0, 1] = torch.linspace(0.02, 0.01, P)
    valid = torch.full((B, H), P)
    counts = policies.AdaKV(0.2).head_counts(s, 20, valid)
    assert counts.tolist() == [[5, 35]], counts
    assert policies.SelectionPolicy().head_counts(s, 20, valid).tolist() == [[20, 20]]
    assert policies.AdaKV(0.5).head_counts(s, 20, valid).tolist() == [[10, 30]], "the floor holds"


def test_adakv_ties_go_to_the_lower_head_then_position():
    s = torch.ones(1, 3, 10)
    counts = policies.AdaKV(0.2).head_counts(s, 4, torch.full((1, 3), 10))
    # floors: floor(0.2 * 4) = 0; the 12 shared entries tie: head 0 first, then head 1
    assert counts.tolist() == [[10, 2, 0]]
    keep = policies.keep_mask(s, counts, None, 2)
    assert keep[0, 1, :10].tolist() == [True, True] + [False] * 8
    assert keep[0, 2].tolist() == [False] * 10 + [True, True]


def test_nan_scores_rank_last():
    s = torch.tensor([[[float("nan"), 1.0, float("-inf"), 0.5]]])
    keep = policies.keep_mask(s, torch.tensor([[3]]), None, 1)
    assert keep[0, 0].tolist() == [False, True, True, True, True]


@pytest.mark.parametrize("make,msg", [
    (lambda: policies.resolve("h2o"), "policy must be one of snapkv, pyramidkv, adakv, ada-pyramidkv"),
    (lambda: policies.AdaKV(1.0), "floor must be a fraction in [0, 1), got 1.0"),
    (lambda: policies.AdaKV(-0.1), "floor must be a fraction in [0, 1)"),
    (lambda: policies.PyramidKV(0.5), "beta must be a number >= 1"),
    (lambda: policies.resolve(policies.AdaKV), "not the class AdaKV (write AdaKV())"),
    (lambda: policies.resolve(object()), "lacks layer_capacities, head_counts, per_head"),
    (lambda: policies.check_capacities(policies.PyramidKV(), [10, 5], 64, 8, 2), "larger than window_size"),
    (lambda: policies.check_capacities(policies.PyramidKV(), [70], 64, 8, 2), "must return 2 integers"),
    (lambda: policies.check_counts(policies.AdaKV(), torch.tensor([[30, 30]]), 20, torch.full((1, 2), 100), (1, 2)),
     "at most H_kv * budget = 40"),
    (lambda: policies.check_counts(policies.AdaKV(), torch.tensor([1, 2]), 20, torch.full((1, 2), 100), (1, 2)),
     "must return a [1, 2] integer tensor"),
])
def test_bad_policies(make, msg):
    with pytest.raises(ValueError, match=None) as e:
        make()
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("seed", range(6))
def test_threshold_path_equals_the_sorting_rule_on_heavy_ties(seed):
    """The allocation's k-th-value path (no sort) on scores with many ties, left padding per row
    and head and a few NaN (which send a row to the sorting path): equal to the loop reference."""
    g = torch.Generator().manual_seed(seed)
    B, H, P, w = 2, 3, 40, 4
    scores = torch.randint(0, 4, (B, H, P), generator=g).float()
    if seed % 3 == 2:
        scores[0, 1, 5] = float("nan")
    pad = torch.randint(0, 30, (B,), generator=g)
    budget = int(torch.randint(1, 20, (1,), generator=g))
    for name in ("adakv", "snapkv"):
        policy = policies.resolve(name)
        valid = policies.valid_prefix(pad, B, H, P, scores.device)
        got = policies.keep_mask(scores, policy.head_counts(scores, budget, valid), pad, w)
        want = reference.policy_keep_scored(scores.double(), w, budget + w, name, 0.2, pad)
        assert torch.equal(got, want), f"{name}, seed {seed}"
