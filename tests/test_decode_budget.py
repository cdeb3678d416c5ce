"""Compression during generation (SnapKVConfig.max_capacity_decode): each layer stays within its
decode budget plus the interval while generating; every re-selection equals the float64 reference
on the same keys and the model's own queries of the last window_size tokens; a budget at or above
the length changes nothing; batches, policies, scorers, beams, sliding layers and documents."""
import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from conftest import greedy, left_pad, prompt
from snapkv_ext import SnapKVCache, SnapKVConfig, SnapKVDocument, reference
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.layers import SnapKVLayer
from snapkv_ext.tools.models import tiny_model

W = 8
DECODE = dict(max_capacity_prompt=64, window_size=W, kernel_size=5, max_capacity_decode=40, decode_interval=12)
BOUND = 40 + 12


class Held(LogitsProcessor):
    """Records, at every generated token, the most entries a global layer holds per KV head (on
    average over a row's heads: per-head policies give heads different shares)."""

    def __init__(self, cache):
        self.cache, self.held = cache, []

    def __call__(self, input_ids, scores):
        self.held.append(max(lay.held_per_head() for lay in self.cache.layers if isinstance(lay, SnapKVLayer)))
        return scores


def generate(model, ids, cache, n, mask=None, **kw):
    held = Held(cache)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                             min_new_tokens=n, do_sample=kw.pop("do_sample", False), pad_token_id=0,
                             logits_processor=LogitsProcessorList([held]), **kw, **cache_kwargs(model, cache))
    return out[:, ids.shape[1]:], held.held


def test_a_budget_at_or_above_the_length_changes_nothing():
    model = tiny_model("llama", layers=2)
    ids = prompt(60, batch=2)
    want = greedy(model, ids, DynamicCache(config=model.config), n=40)
    cache = SnapKVCache(model, max_capacity_prompt=200, window_size=W, max_capacity_decode=100, decode_interval=1)
    assert torch.equal(greedy(model, ids, cache, n=40), want)
    assert cache.stats()["compressions"] == [0, 0]


@pytest.mark.parametrize("policy,store", [("snapkv", None), ("pyramidkv", None), ("adakv", None), ("snapkv", "ragged")])
def test_bounded_while_generating(policy, store):
    """Every generated token: at most budget + interval entries per head (the layer's policy share;
    the prompt's selection keeps max_capacity_prompt until the first step); after a re-selection the
    buffers are the budget plus the interval, not the tokens generated; on either store."""
    model = tiny_model("llama", layers=3)
    cache = SnapKVCache(model, **DECODE, policy=policy, store=store)
    out, held = generate(model, prompt(100), cache, 150)
    caps = [lay.decode_capacity() for lay in cache.layers]
    assert held[0] == max(min(100, lay.capacity_for(100)) for lay in cache.layers)  # after the prompt
    assert max(held[1:]) <= max(caps) + DECODE["decode_interval"] and out.shape[1] == 150
    assert all(c > 1 for c in cache.stats()["compressions"])
    entry = cache.layers[0].entry_bytes()
    assert cache.stats()["allocated_bytes"] == sum(c + cache.config.reserve for c in caps) * entry
    if store is not None:  # the same re-selections as on the policy's own store
        assert torch.equal(out, generate(model, prompt(100), SnapKVCache(model, **DECODE, policy=policy), 150)[0])


def _model_queries(model, layer_idx):
    """Captures the post-RoPE queries of one attention module at every forward, computed with the
    modeling file's own apply_rotary_pos_emb (not the library's query path)."""
    import sys

    att = model.model.layers[layer_idx].self_attn
    rope = sys.modules[type(att).__module__].apply_rotary_pos_emb
    seen = []

    def hook(module, args, kwargs):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        q = module.q_proj(h).view(h.shape[0], h.shape[1], -1, module.head_dim).transpose(1, 2)
        seen.append(rope(q, q, cos, sin)[0].detach())

    return seen, att.register_forward_pre_hook(hook, with_kwargs=True)


def test_each_ragged_reselection_equals_the_reference(monkeypatch):
    """AdaKV (a ragged store, one budget shared by a row's heads): at every decode-time re-selection
    of layer 1, the kept positions equal the float64 reference: each head's SnapKV scores over its
    own entries with its group's window queries, then AdaKV's allocation over the row's heads."""
    import torch.nn.functional as F

    from snapkv_ext.layers import RaggedSnapKVLayer

    model = tiny_model("llama", layers=2)
    checked = []
    real = RaggedSnapKVLayer._reselect

    def spy(self, pending):
        before = self.positions.clone()
        keys = self.flat.held()[0].clone()
        lengths = self.flat.lengths.clone()
        real(self, pending)
        if self.layer_idx != 1:
            return
        B, H = lengths.shape
        q = pending.q_window.double()
        G, w = q.shape[1] // H, q.shape[2]
        n_max = int(lengths.max())
        scores = torch.full((B, H, n_max - w), float("-inf"), dtype=torch.float64)
        start = 0
        for b in range(B):
            for h in range(H):
                n = int(lengths[b, h])
                k = keys[start:start + n].double()[None, None]
                start += n
                s = reference.pool_scores(reference.window_scores(q[b:b + 1, h * G:(h + 1) * G], k), 5, "max")
                scores[b, h, n_max - n:] = s[0, 0]
        # a head's padding (shorter segments) scores -inf: ranked after every real entry
        keep = reference.policy_keep_scored(scores, w, pending.max_capacity_prompt, "adakv", 0.2)
        for b in range(B):
            for h in range(H):
                n = int(lengths[b, h])
                pos = F.pad(before[b, h, :n], (n_max - n, 0), value=-1)
                want = sorted(pos[keep[b, h]].tolist())
                got = sorted(p for p in self.positions[b, h].tolist() if p >= 0)
                assert got == want, f"row {b} head {h}"
        checked.append(1)

    monkeypatch.setattr(RaggedSnapKVLayer, "_reselect", spy)
    generate(model, prompt(90), SnapKVCache(model, **DECODE, policy="adakv"), 60)
    assert len(checked) >= 3


@pytest.mark.parametrize("queries", ["tap", "projection"])
def test_each_reselection_equals_the_reference(monkeypatch, queries):
    """At every decode-time re-selection of layer 1: the window is the model's own queries of the
    last window_size tokens, and the entries kept are the float64 reference's on the same keys.
    "tap": the routed attention hands the cache its queries (no projection but the selecting
    step's own); "projection": the model's attention was switched back to its unrouted function
    after the cache was made, and the cache projects the hidden states itself."""
    from snapkv_ext import routing
    from snapkv_ext.adapters import AttentionLayer

    policy = "snapkv"
    model = tiny_model("llama", layers=2)
    seen, handle = _model_queries(model, 1)
    calls = []
    real = SnapKVLayer._store_selection

    def spy(self, k_all, v_all, pos_all, pending):
        if self.layer_idx == 1:
            calls.append((k_all.clone(), pos_all.clone(), pending))
        return real(self, k_all, v_all, pos_all, pending)

    projections = []
    real_project = AttentionLayer.window_queries

    def count(self, hidden_states, position_embeddings, w):
        if self.layer_idx == 1 and hidden_states.shape[1] == 1:
            projections.append(w)
        return real_project(self, hidden_states, position_embeddings, w)

    monkeypatch.setattr(SnapKVLayer, "_store_selection", spy)
    monkeypatch.setattr(AttentionLayer, "window_queries", count)
    cache = SnapKVCache(model, **DECODE, policy=policy)
    assert model.config._attn_implementation == routing.PREFIX + "sdpa"
    if queries == "projection":
        model.config._attn_implementation = "sdpa"
    try:
        generate(model, prompt(90), cache, 60)
    finally:
        handle.remove()
    queries_seen = torch.cat(seen, dim=2)  # every position's query, in order
    decode_calls = calls[1:]
    assert len(decode_calls) >= 3
    if queries == "tap":  # one projection per re-selection: the selecting token's query
        assert len(projections) == len(decode_calls) and not routing._taps
    else:
        assert len(projections) > W * len(decode_calls) // 2
    for k_all, pos_all, pending in decode_calls:
        last = int(pos_all.max())
        torch.testing.assert_close(pending.q_window, queries_seen[:, :, last - W + 1: last + 1], rtol=1e-5, atol=1e-5)
    # the kept positions: replay each selection on its keys with the float64 reference
    for (k_all, pos_all, pending), (k_next, pos_next, _) in zip(decode_calls, decode_calls[1:] + [(None, None, None)]):
        want = reference.policy_keep(pending.q_window.double(), k_all.double(), pending.max_capacity_prompt, policy,
                                     kernel_size=5)
        kept = {tuple(sorted(pos_all[0, h][want[0, h]].tolist())) for h in range(k_all.shape[1])}
        if pos_next is not None:  # what the layer held at the next re-selection, minus what came after
            after = int(pos_all.max())
            got = {tuple(sorted(p for p in pos_next[0, h].tolist() if 0 <= p <= after)) for h in range(k_all.shape[1])}
            assert got == kept


@pytest.mark.parametrize("settings", [dict(DECODE, policy="adakv"),  # re-selections while decoding
                                      dict(max_capacity_prompt=64, window_size=W, kernel_size=5, policy="adakv",
                                           decode_reserve=3)])  # no decode budget: the store grows
def test_ragged_decode_steps_read_no_device_value(monkeypatch, settings):
    """A ragged layer's decode step reads nothing back from its tensors (on a GPU: no host round
    trip per step): its host copies of the longest segment, the most a row holds and the free rows
    stay equal to the tensors' values after every update; only a step that lays the store out
    again (a re-selection, or growth) reads them."""
    from snapkv_ext.layers import RaggedSnapKVLayer

    model = tiny_model("llama", layers=2)
    reads, state = [], {"in": False}
    for name in ("__int__", "__bool__", "__index__", "item", "tolist"):
        real_read = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real_read, **k):
            if state["in"]:
                reads.append(1)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real = RaggedSnapKVLayer.update
    plain_steps = []

    def spy(self, k, v, *a, **kw):
        was = self.flat.k if self.ragged else None
        state["in"], before = True, len(reads)
        try:
            out = real(self, k, v, *a, **kw)
        finally:
            state["in"] = False
        if was is not None and self.flat.k is was:  # a plain step: appended in place
            plain_steps.append(len(reads) - before)
        if self.ragged:
            flat = self.flat
            state_len = flat.lengths
            assert flat.len_max == int(state_len.max()) and flat.row_max == int(state_len.sum(1).max())
            ends = torch.cat([flat.starts.flatten()[1:], torch.tensor([flat.k.shape[0]])])
            room = ends - (flat.starts + state_len).flatten()
            assert flat.room == int(room.min()) == int(room.max())
        return out

    monkeypatch.setattr(RaggedSnapKVLayer, "update", spy)
    generate(model, prompt(90), SnapKVCache(model, **settings), 60)
    assert len(plain_steps) > 40 and set(plain_steps) == {0}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padded_rows_equal_alone(arch):
    model = tiny_model(arch, layers=3)
    rows = [prompt(90, seed=1), prompt(70, seed=2)]
    ids, mask = left_pad(rows)
    both, held = generate(model, ids, SnapKVCache(model, **DECODE), 50, mask=mask)
    for r, row in enumerate(rows):
        alone, _ = generate(model, row, SnapKVCache(model, **DECODE), 50)
        assert torch.equal(both[r], alone[0]), f"row {r}"
    assert max(held[1:]) <= BOUND


@pytest.mark.parametrize("scorer", ["keynorm", "tova", "streamingllm"])
def test_any_scorer_beams_and_sampling(scorer):
    model = tiny_model("llama", layers=2)
    for kw in (dict(num_beams=2), dict(do_sample=True, top_k=5)):
        cache = SnapKVCache(model, **DECODE, scorer=scorer)
        out, held = generate(model, prompt(80, batch=2), cache, 40, **kw)
        assert out.shape == (2, 40) and max(held[1:]) <= BOUND


def test_document_with_a_decode_budget():
    model = tiny_model("llama", layers=2)
    doc_ids, q = prompt(150, seed=3), prompt(12, seed=4)
    doc = SnapKVDocument(model, doc_ids, **DECODE)
    want, _ = generate(model, torch.cat([doc_ids, q], 1), SnapKVCache(model, **DECODE), 40)
    assert torch.equal(doc.generate(q, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0), want)


def test_bad_decode_settings_refused():
    with pytest.raises(ValueError, match=r"^max_capacity_decode: policy pyramidkv: layer_capacities\(24, 8, 3\) must"):
        SnapKVCache(tiny_model("llama", layers=3), max_capacity_decode=24, window_size=8, policy="pyramidkv")
    for kw, match in [(dict(max_capacity_decode=8, window_size=8), "max_capacity_decode must be None or an integer "
                                                                    r"larger than window_size \(8\), got 8"),
                      (dict(max_capacity_decode=1.5), "max_capacity_decode must be"),
                      (dict(decode_interval=0), "decode_interval must be a positive integer, got 0")]:
        with pytest.raises(ValueError, match=match):
            SnapKVConfig(**kw)
