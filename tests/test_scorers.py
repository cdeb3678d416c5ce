"""Scorers (snapkv_ext.scorers): each built-in one against a float64 oracle written from its paper,
on the model's own keys, values and attention probabilities; with every store (dense, ragged),
batched with left padding, in generate(), layer-major prefill and the document API.

A new scorer is one class in snapkv_ext/scorers.py plus one entry in ORACLES below.
"""
import pytest
import torch
from transformers import DynamicCache

from conftest import greedy, left_pad, prompt
from snapkv_ext import SnapKVCache, SnapKVConfig, SnapKVDocument, reference, scorers
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.prefill import prefill
from snapkv_ext.stores import STORES
from snapkv_ext.tools.models import tiny_model

W, C = 8, 40  # observation window, kept entries per KV head


# ---- the oracles: [B, H_kv, P] float64 scores from what the model computed (its attention
# probabilities probs [B, H_q, L, L], its keys and values [B, H_kv, L, D]), per the papers


def streamingllm_oracle(probs, keys, values, pad, sinks=4):
    """Xiao et al. 2024: the first `sinks` tokens (attention sinks), then the most recent."""
    B, H, L, _ = keys.shape
    P = L - W
    s = torch.zeros(B, H, P, dtype=torch.float64)
    for b in range(B):
        for j in range(P):
            s[b, :, j] = float("inf") if j - int(pad[b]) < sinks else j
    return s


def keynorm_oracle(probs, keys, values, pad):
    """Devoto et al. 2024: keep the keys of lowest L2 norm."""
    P = keys.shape[2] - W
    return -keys[:, :, :P].double().pow(2).sum(-1).sqrt()


def tova_oracle(probs, keys, values, pad):
    """Oren et al. 2024: the last token's attention, averaged over the layer's heads."""
    H, P = keys.shape[1], keys.shape[2] - W
    return probs.double()[:, :, -1, :P].mean(1, keepdim=True).expand(-1, H, -1)


def vatp_oracle(probs, keys, values, pad):
    """Guo et al. 2024: attention received (here from the observation window) times ||v||_1."""
    B, Hq = probs.shape[:2]
    H, P = keys.shape[1], keys.shape[2] - W
    att = probs.double()[:, :, -W:, :P].mean(2).view(B, H, Hq // H, P).mean(2)
    return att * values[:, :, :P].double().abs().sum(-1)


ORACLES = {"streamingllm": streamingllm_oracle, "keynorm": keynorm_oracle, "tova": tova_oracle,
           "vatp": vatp_oracle}


def test_every_scorer_has_an_oracle():
    assert set(scorers.SCORERS) - {"snapkv"} == set(ORACLES)  # snapkv's: tests/test_families.py


def model_sees(model, ids, mask):
    """The model's own attention probabilities per layer and its keys and values (eager, fp32)."""
    kw = {} if mask is None else dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))
    dc = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=True, **cache_kwargs(model, dc), **kw)
    return out.attentions, [(lay.keys, lay.values) for lay in dc.layers], kw


def distinct(n, seed):
    """n distinct token ids: a repeated token has keys of equal norm (RoPE rotates, it does not
    scale), an exact tie that float32 and float64 may order differently."""
    return torch.randperm(1024, generator=torch.Generator().manual_seed(seed))[:n][None]


@pytest.mark.parametrize("policy,store", [("snapkv", "dense"), ("snapkv", "ragged"), ("adakv", "ragged")])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3", "gemma2"])
@pytest.mark.parametrize("name", sorted(ORACLES))
def test_selection_equals_the_oracle_on_the_models_own_attention(name, arch, policy, store):
    model = tiny_model(arch, layers=3, vocab=1024, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # a key norm at its initial weights gives every key the same norm
        if hasattr(m, "k_norm"):
            m.k_norm.weight.data.copy_(torch.rand(m.k_norm.weight.shape, generator=g) + 0.5)
    ids, mask = left_pad([distinct(150, 1), distinct(120, 2)])
    probs, kv, kw = model_sees(model, ids, mask)
    cache = SnapKVCache(model, max_capacity_prompt=C, window_size=W, policy=policy, scorer=name, store=store)
    with torch.no_grad():
        model(ids, **kw, **cache_kwargs(model, cache))
    pad = (mask == 0).sum(1)
    checked = 0
    for i, layer in enumerate(cache.layers):
        if layer.is_sliding:
            continue
        keys, values = kv[i]
        want = reference.policy_keep_scored(ORACLES[name](probs[i], keys, values, pad), W, C, policy, 0.2, pad)
        kept = cache.kept_positions(i)
        for b in range(2):
            for h in range(keys.shape[1]):
                got = sorted(p for p in kept[b, h].tolist() if p >= 0)
                assert got == want[b, h].nonzero()[:, 0].tolist(), f"{name}/{policy}: layer {i} row {b} KV head {h}"
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", sorted(scorers.SCORERS))
def test_scores_on_awkward_inputs(name):
    """Direct: each scorer's scores of random keys/queries with padding against its oracle on the
    probabilities recomputed in float64 (scale and soft-cap applied as the model would)."""
    g = torch.Generator().manual_seed(3)
    B, Hq, H, L, D = 2, 6, 2, 37, 16
    q = torch.randn(B, Hq, W, D, generator=g)
    k, v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    pad = torch.tensor([0, 5])
    cfg = SnapKVConfig(max_capacity_prompt=C, window_size=W, kernel_size=5)
    s = scorers.resolve(name).score(scorers.ScoreInput(k, v, q, pad, 0.3, 20.0, cfg))
    assert s.shape == (B, H, L - W)
    if name == "snapkv":
        want = reference.pool_scores(reference.window_scores(q, k, pad, "mean", 0.3, 20.0), 5, "max", pad).double()
    else:
        logits = torch.matmul(q.double(), k.double().repeat_interleave(Hq // H, 1).transpose(-1, -2)) * 0.3
        logits = 20.0 * torch.tanh(logits / 20.0)
        full = torch.zeros(B, Hq, L, L, dtype=torch.float64)
        for b in range(B):
            for i in range(W):
                t = L - W + i
                x = logits[b, :, i].clone()
                x[:, : int(pad[b])] = float("-inf")
                x[:, t + 1:] = float("-inf")
                full[b, :, t] = x.softmax(-1)
        want = ORACLES[name](full, k, v, pad)
    real = torch.arange(L - W)[None] >= pad[:, None]  # scores at padded positions are not used
    torch.testing.assert_close(s.double()[real[:, None].expand_as(s)], want[real[:, None].expand_as(want)],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("store", sorted(STORES))
@pytest.mark.parametrize("name", sorted(ORACLES))
def test_generate_prefill_and_document(name, store):
    """Every scorer on every store in generate() (a left-padded batch: each row as if alone),
    layer-major prefill (the same cache as one-shot) and the document API (the same answer as from
    scratch)."""
    from test_prefill import assert_same_cache, one_shot

    model = tiny_model("llama", layers=3)
    settings = dict(max_capacity_prompt=64, window_size=16, scorer=name, store=store)
    rows = [prompt(200, seed=1), prompt(150, seed=2)]
    ids, mask = left_pad(rows)
    both = greedy(model, ids, SnapKVCache(model, **settings), n=6, attention_mask=mask)
    for r, row in enumerate(rows):
        alone = greedy(model, row, SnapKVCache(model, **settings), n=6)
        assert torch.equal(both[r], alone[0]), f"row {r}"
    ref, ref_logits = one_shot(model, prompt(300, batch=2), **settings)
    cache = SnapKVCache(model, **settings)
    logits = prefill(model, prompt(300, batch=2), cache, chunk_size=70)
    assert_same_cache(ref, cache)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    doc_ids, question = prompt(220, seed=5), prompt(20, seed=6)
    doc = SnapKVDocument(model, doc_ids, scorer=name, max_capacity_prompt=64, window_size=16, store=store)
    want = greedy(model, torch.cat([doc_ids, question], 1), SnapKVCache(model, **settings), n=6)
    assert torch.equal(doc.generate(question, max_new_tokens=6, do_sample=False), want)
    assert cache.stats()["scorer"] == name


def test_a_scorer_of_ones_own(tmp_path):
    """One small class is a scorer: it runs, equals its definition, is refused (one line) when it
    returns the wrong shape, and a document with it cannot be saved."""
    class Recent(scorers.Scorer):
        name = "recent"

        def score(self, inp):
            P = inp.prefix
            return torch.arange(P, dtype=torch.float32).expand(inp.keys.shape[0], inp.keys.shape[1], P)

    model = tiny_model("llama", layers=2)
    cache = SnapKVCache(model, max_capacity_prompt=40, window_size=8, scorer=Recent())
    with torch.no_grad():
        model(prompt(100), **cache_kwargs(model, cache))
    assert torch.equal(cache.kept_positions(0)[0, 0], torch.arange(60, 100))

    class Bad(Recent):
        def score(self, inp):
            return super().score(inp)[..., 1:]

    with pytest.raises(ValueError, match=r"^scorer recent: score\(\) must return a float tensor of shape \(1, 2, 92\)"):
        with torch.no_grad():
            model(prompt(100), **cache_kwargs(model, SnapKVCache(model, max_capacity_prompt=40, window_size=8,
                                                                  scorer=Bad())))
    doc = SnapKVDocument(model, prompt(100), scorer=Recent(), max_capacity_prompt=40, window_size=8)
    with pytest.raises(ValueError, match="scorer Recent is not a built-in scorer"):
        doc.save(str(tmp_path / "d.pt"))


def test_bad_scorers_refused_in_one_line():
    for bad, match in [("h2o", r"scorer must be one of snapkv, streamingllm, keynorm, tova, vatp or a scorer object, "
                                r"got 'h2o'"),
                       (scorers.KeyNorm, "got <class"), (object(), "with score")]:
        with pytest.raises(ValueError, match=match) as e:
            SnapKVConfig(scorer=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="sinks must be a non-negative integer"):
        scorers.StreamingLLM(sinks=-1)


def test_saved_document_keeps_its_scorer(tmp_path):
    model = tiny_model("llama", layers=2)
    doc = SnapKVDocument(model, prompt(100), scorer=scorers.StreamingLLM(sinks=2), max_capacity_prompt=40,
                         window_size=8)
    doc.save(str(tmp_path / "d.pt"))
    loaded = SnapKVDocument.load(model, str(tmp_path / "d.pt"))
    assert loaded.config.scorer == scorers.StreamingLLM(sinks=2) and loaded.config == doc.config
    q = prompt(12, seed=9)
    assert torch.equal(loaded.generate(q, max_new_tokens=4, do_sample=False),
                       doc.generate(q, max_new_tokens=4, do_sample=False))
