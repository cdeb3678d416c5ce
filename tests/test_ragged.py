"""Per-head budgets on a ragged cache, and every store under every policy it can hold: decoding
equals the model's own attention over the full cache with each head masked to what it keeps (the
masked, kvpress-style oracle)."""
import re
import sys

import pytest
import torch
from conftest import greedy, left_pad, prompt

from snapkv_ext import SnapKVCache, policies, reference
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.layers import RaggedSnapKVLayer
from snapkv_ext.stores import STORES
from snapkv_ext.tools.models import TINY_CONFIGS, tiny_model

# Every store (snapkv_ext.stores.STORES) with every policy it can hold: a new store or policy is in
# the table by being registered.
STORE_POLICIES = [(s, p) for s in STORES for p in policies.POLICIES
                  if STORES[s].per_head or not policies.POLICIES[p].per_head]


def _masked_attention_factory(keep, L):
    """An attention function over the full cache where, after the prompt, query head h of layer i
    sees only the prompt entries its KV head keeps (``keep[i] [B, H_kv, L]``) and every new token."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1 and key.shape[2] > L:
            B, H_q, T = query.shape[0], query.shape[1], key.shape[2]
            k = keep[module.layer_idx]
            G = H_q // k.shape[1]
            allowed = torch.ones(B, H_q, 1, T, dtype=torch.bool)
            allowed[..., :L] = k.repeat_interleave(G, dim=1)[:, :, None, :]
            add = torch.zeros(B, H_q, 1, T).masked_fill(~allowed, float("-inf"))
            if attention_mask is not None:  # eager's additive mask (nothing masked here: no padding)
                add = add + attention_mask[..., -T:]
            attention_mask = add
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return attention


def _keep_sets(cache, L):
    keep = []
    for layer in cache.layers:
        pos = layer.positions  # [B, H, held] padded with -1
        B, H, _ = pos.shape
        n = int(pos.max()) + 2
        k = torch.zeros(B, H, n, dtype=torch.bool)
        k.scatter_(2, torch.where(pos >= 0, pos, n - 1), True)
        assert k[..., L:n - 1].all(), "every decoded token is kept"
        keep.append(k[..., :L])
    return keep


@pytest.mark.parametrize("store,policy", STORE_POLICIES)
def test_decode_equals_masked_full_cache(store, policy):
    from transformers import AttentionInterface, DynamicCache

    model = tiny_model("llama", layers=3)
    L, steps = 200, 5
    ids = prompt(L)
    cache = SnapKVCache(model, max_capacity_prompt=64, window_size=8, policy=policy, store=store)
    assert all(type(layer) is STORES[store] for layer in cache.layers)
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, cache))
        logits, nxt = [out.logits[:, -1]], out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [nxt]
        for _ in range(steps):
            out = model(nxt, **cache_kwargs(model, cache))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            logits.append(out.logits[:, -1])
            toks.append(nxt)
    keep = _keep_sets(cache, L)
    assert all(layer.ragged for layer in cache.layers if isinstance(layer, RaggedSnapKVLayer))
    if policies.POLICIES[policy].per_head:
        lengths = cache.layers[0].kept_lengths()
        assert lengths.sum() == 2 * (cache.layers[0].capacity_for(L) + steps) and len(set(lengths.flatten().tolist())) > 1, \
            "the heads keep different numbers of entries, the layer the uniform total"
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("masked_oracle", _masked_attention_factory(keep, L))
    AttentionMaskInterface.register("masked_oracle", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    oracle = tiny_model("llama", layers=3, attn_implementation="masked_oracle")
    full = DynamicCache(config=oracle.config)
    with torch.no_grad():
        got = [oracle(ids, **cache_kwargs(oracle, full)).logits[:, -1]]
        for t in toks[:-1]:
            got.append(oracle(t, **cache_kwargs(oracle, full)).logits[:, -1])
    for i, (a, b) in enumerate(zip(logits, got)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {i}")


def test_ragged_bytes_are_what_is_kept():
    model = tiny_model("llama", layers=2)
    cache = SnapKVCache(model, max_capacity_prompt=64, window_size=8, policy="adakv", decode_reserve=16)
    ids = prompt(300)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    layer = cache.layers[0]
    D, elem = model.config.head_dim, 4
    kept = int(layer.kept_lengths().sum())
    assert kept == 2 * 64
    assert layer.nbytes() == 2 * kept * D * elem
    assert layer.allocated_bytes() == 2 * (kept + 2 * 16) * D * elem, "kept entries plus the decode reserve"
    store = layer.flat.k.data_ptr()
    nxt = ids[:, -1:]
    with torch.no_grad():
        for _ in range(16):  # within the reserve: appended in place
            model(nxt, **cache_kwargs(model, cache))
    assert layer.flat.k.data_ptr() == store
    assert cache.stats()["kept_entries"][0] == 2 * (64 + 16)


def test_left_padded_rows_equal_rows_alone():
    model = tiny_model("llama", layers=2)
    rows = [prompt(200, seed=1), prompt(150, seed=2), prompt(90, seed=3)]
    ids, mask = left_pad(rows)
    kw = dict(max_capacity_prompt=64, window_size=8, policy="adakv")
    batch = greedy(model, ids, SnapKVCache(model, **kw), attention_mask=mask)
    for i, r in enumerate(rows):
        assert torch.equal(batch[i:i + 1], greedy(model, r, SnapKVCache(model, **kw))), f"row {i}"


def test_the_ragged_store_keeps_no_padding_under_the_uniform_policy():
    """SnapKV's uniform policy on the ragged store: the same tokens and kept positions as on the
    dense store, without the padding a row shorter than the budget costs the dense one."""
    model = tiny_model("llama", layers=2)
    rows = [prompt(200, seed=1), prompt(40, seed=2)]
    ids, mask = left_pad(rows)
    kw = dict(max_capacity_prompt=64, window_size=8, decode_reserve=16)
    dense, ragged = SnapKVCache(model, **kw), SnapKVCache(model, **kw, store="ragged")
    assert torch.equal(greedy(model, ids, dense, attention_mask=mask), greedy(model, ids, ragged, attention_mask=mask))
    n = dense.get_seq_length() - 200  # tokens decoded after the prompt
    H, D = model.config.num_key_value_heads, model.config.head_dim
    for i, (a, b) in enumerate(zip(dense.layers, ragged.layers)):
        assert b.ragged and torch.equal(b.kept_lengths(), torch.tensor([[64 + n] * H, [40 + n] * H])), f"layer {i}"
        for r in range(2):
            for h in range(H):
                assert sorted(p for p in b.positions[r, h].tolist() if p >= 0) == \
                    sorted(p for p in a.positions[r, h].tolist() if p >= 200 - 40 * r or r == 0), (i, r, h)
        assert a.nbytes() == 2 * 2 * H * (64 + n) * D * 4, "dense: the short row padded to the longest"
        assert b.nbytes() == 2 * H * (64 + 40 + 2 * n) * D * 4, "ragged: exactly what is kept"
    assert ragged.stats()["store"] == "ragged" and dense.stats()["store"] == "dense"


def test_stores_refused_in_one_line(tmp_path):
    from snapkv_ext import SnapKVDocument

    model = tiny_model("llama", layers=2)
    for kw, msg in [(dict(policy="adakv", store="dense"), "store 'dense' holds every KV head of a layer at one "
                     "length, and policy 'adakv' gives each head its own count: use store='ragged'"),
                    (dict(store="paged"), "store must be one of dense, ragged or a SnapKVLayer subclass, got 'paged'"),
                    (dict(store=dict), "store must be one of dense, ragged or a SnapKVLayer subclass, got <class 'dict'>")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            SnapKVCache(model, max_capacity_prompt=32, window_size=8, **kw)

    class Mine(RaggedSnapKVLayer):
        """A store of one's own: the ragged one, counting its packings."""
        packings = 0

        def _pack(self, flat):
            type(self).packings += 1
            super()._pack(flat)

    kw = dict(max_capacity_prompt=32, window_size=8, policy="adakv")
    cache = SnapKVCache(model, **kw, store=Mine)
    want = SnapKVCache(model, **kw)
    ids = prompt(100)
    assert torch.equal(greedy(model, ids, cache), greedy(model, ids, want))
    assert Mine.packings == 2 and cache.stats()["store"] == "Mine"
    d = SnapKVDocument(model, ids, **kw, store=Mine)
    assert d.config.to_dict()["store"] == "Mine"
    with pytest.raises(ValueError, match="store Mine is not a built-in store .dense, ragged.: it cannot be saved"):
        d.save(tmp_path / "doc")


# ---- every policy, every family: the selection is SnapKV's from the model's own attention ----

POLICIES = ["snapkv", "pyramidkv", "adakv", "ada-pyramidkv"]
SEL_L, SEL_W, SEL_C, SEL_K = 160, 8, 40, 5


def _kept_sets(positions, prefix):
    """[B, H, held] positions (padded with -1) -> [B, H, prefix] bool over the prompt's prefix."""
    B, H, _ = positions.shape
    out = torch.zeros(B, H, prefix + 1, dtype=torch.bool)
    out.scatter_(2, torch.where((positions >= 0) & (positions < prefix), positions, prefix), True)
    return out[..., :prefix]


def assert_same_keep(got, want, scores, where):
    """got / want [H, P] bool: equal, except that entries whose float64 oracle scores are equal
    within float32 rounding may trade places (within a head, or across heads under AdaKV)."""
    extra, missing = (got & ~want).nonzero().tolist(), (want & ~got).nonzero().tolist()
    assert len(extra) == len(missing), f"{where}: kept {int(got.sum())} entries, the reference {int(want.sum())}"
    if not extra:
        return
    tol = 1e-5 * float(scores.max())
    a = sorted(float(scores[h, j]) for h, j in extra)
    b = sorted(float(scores[h, j]) for h, j in missing)
    assert all(abs(x - y) <= tol for x, y in zip(a, b)), f"{where}: kept {extra} instead of {missing} ({a} vs {b})"


@pytest.mark.filterwarnings("ignore:SnapKVCache. every layer")
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", [a for a in sorted(TINY_CONFIGS) if a != "mistral-sliding"])
def test_selection_equals_the_policy_reference_on_the_models_own_attention(arch, policy):
    from test_families import oracle_scores

    model = tiny_model(arch, layers=4, heads=4, kv_heads=2, head_dim=16, attn_implementation="eager")
    ids = prompt(SEL_L, seed=7)
    with torch.no_grad():
        probs = model(ids, output_attentions=True, use_cache=False).attentions
        cache = SnapKVCache(model, max_capacity_prompt=SEL_C, window_size=SEL_W, kernel_size=SEL_K, policy=policy)
        model(ids, **cache_kwargs(model, cache))
    global_layers = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
    caps = reference.policy_capacities(policy, SEL_C, SEL_W, len(global_layers))
    if policy in ("pyramidkv", "ada-pyramidkv"):
        assert len(set(caps)) > 1 or len(global_layers) == 1
    P = SEL_L - SEL_W
    for rank, i in enumerate(global_layers):
        scores = oracle_scores(probs[i][0], 2, SEL_W, SEL_K)
        want = reference.policy_keep_scored(scores[None], SEL_W, caps[rank], policy)
        positions = cache.kept_positions(i)
        kept = _kept_sets(positions, P)[0]
        assert int((positions[0] >= P).sum()) == 2 * SEL_W, "every head keeps the window"
        assert int(kept.sum()) == 2 * (caps[rank] - SEL_W), f"layer {i}: the layer's budget"
        assert_same_keep(kept, want[0, :, :P], scores, f"{arch} {policy} layer {i}")


# ---- decoding, every family: the model's own attention over the full cache, masked per head ----


def _masked_oracle(state):
    """An attention function over the full cache (the model's own eager attention) where query
    head h of layer i sees, of the positions ``state["keep"][i] [B, H_kv, n]`` covers, only those
    its KV head keeps, and every later position (None: the whole layer, e.g. a sliding layer);
    ``state["decode_only"]``: only for single-token queries."""
    def attention(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        keep = state.get("keep")
        k = None if keep is None else keep[module.layer_idx]
        if k is not None and (query.shape[2] == 1 or not state.get("decode_only")):
            B, H_q, T = query.shape[0], query.shape[1], key.shape[2]
            n = min(k.shape[-1], T)
            allowed = torch.ones(B, H_q, 1, T, dtype=torch.bool)
            allowed[..., :n] = k[..., :n].repeat_interleave(H_q // k.shape[1], dim=1)[:, :, None]
            add = torch.zeros(B, H_q, 1, T, dtype=query.dtype).masked_fill(~allowed, float("-inf"))
            attention_mask = add if attention_mask is None else attention_mask[..., -T:] + add
        return eager(module, query, key, value, attention_mask, **kwargs)

    return attention


def _keep_state(cache):
    """Per layer: [B, H_kv, n] bool of what each head holds (None for a sliding layer)."""
    keep = []
    for layer in cache.layers:
        if layer.is_sliding:
            keep.append(None)
            continue
        pos = layer.positions
        n = int(pos.max()) + 1
        keep.append(_kept_sets(pos, n))
    return keep


def _oracle_model(arch, state, **kw):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("masked_oracle", _masked_oracle(state))
    AttentionMaskInterface.register("masked_oracle", ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return tiny_model(arch, attn_implementation="masked_oracle", **kw)


def _steps(model, cache, first, steps):
    """Greedy decoding from logits ``first``: (logits of each step, tokens fed)."""
    logits, toks = [first], []
    with torch.no_grad():
        for _ in range(steps):
            toks.append(logits[-1].argmax(-1, keepdim=True))
            logits.append(model(toks[-1], **cache_kwargs(model, cache)).logits[:, -1])
    return logits, toks


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "phi3", "olmo2"])
def test_decode_and_a_second_turn_equal_the_masked_full_cache(arch):
    """Turn 1, decoding, turn 2 (attends over what each head kept, then selects again), decoding:
    every step's logits equal the masked oracle's, with the keep sets read from the cache."""
    from transformers import DynamicCache

    kw = dict(layers=3, heads=4, kv_heads=2)
    model = tiny_model(arch, **kw)
    L, steps = 200, 4
    ids, turn2 = prompt(L, seed=3), prompt(30, seed=4)
    cache = SnapKVCache(model, max_capacity_prompt=64, window_size=8, policy="adakv")
    with torch.no_grad():
        got, toks = _steps(model, cache, model(ids, **cache_kwargs(model, cache)).logits[:, -1], steps)
        keep1 = _keep_state(cache)
        got2 = model(turn2, **cache_kwargs(model, cache)).logits[:, -1]
        keep2 = _keep_state(cache)
        more, toks2 = _steps(model, cache, got2, steps)
    assert any(isinstance(layer, RaggedSnapKVLayer) and layer.ragged for layer in cache.layers)
    first = next(i for i, layer in enumerate(cache.layers) if not layer.is_sliding)
    assert cache.stats()["compressions"][first] == 2, "the second turn selected again"
    state = {}
    oracle = _oracle_model(arch, state, **kw)
    full = DynamicCache(config=oracle.config)
    with torch.no_grad():
        want = [oracle(ids, **cache_kwargs(oracle, full)).logits[:, -1]]
        state["keep"] = keep1
        want += [oracle(t, **cache_kwargs(oracle, full)).logits[:, -1] for t in toks]
        want2 = oracle(turn2, **cache_kwargs(oracle, full)).logits[:, -1]
        state["keep"] = keep2
        want_more = [want2] + [oracle(t, **cache_kwargs(oracle, full)).logits[:, -1] for t in toks2]
    for i, (a, b) in enumerate(zip(got + more, want + want_more)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{arch} step {i}")


def test_beam_search_equals_the_masked_full_cache():
    """num_beams reorders the ragged segments every step: the beams equal the model's own beam
    search over the full cache masked to what each head kept (one row: the beams share it)."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids = prompt(180, seed=5)
    kw = dict(max_capacity_prompt=48, window_size=8, policy="adakv")
    probe = SnapKVCache(model, **kw)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, probe))
    assert all(layer.ragged for layer in probe.layers)
    beams = dict(num_beams=3, num_return_sequences=3, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                 pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        got = model.generate(ids, **cache_kwargs(model, SnapKVCache(model, **kw)), **beams)
    # the prompt's keep sets, the same for every beam; the tokens decoded are all kept
    state = {"keep": [k[..., :180].expand(3, -1, -1) for k in _keep_state(probe)], "decode_only": True}
    oracle = _oracle_model("llama", state, layers=2, heads=4, kv_heads=2)
    with torch.no_grad():
        want = oracle.generate(ids, **beams)
    assert torch.equal(got, want)


@pytest.mark.parametrize("policy", ["adakv", "pyramidkv"])
def test_document_with_a_policy_equals_snapkv_from_scratch(policy, tmp_path):
    from snapkv_ext import SnapKVDocument

    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    doc, kw = prompt(250, seed=0), dict(max_capacity_prompt=64, window_size=8, kernel_size=5, policy=policy)
    d = SnapKVDocument(model, doc, **kw)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    qs = [prompt(20, seed=1), prompt(4, seed=2)]
    for q in qs:
        full = torch.cat([doc, q], dim=1)
        with torch.no_grad():
            want = model.generate(full, attention_mask=torch.ones_like(full),
                                  **cache_kwargs(model, SnapKVCache(model, **kw)), **gen)[:, full.shape[1]:]
        assert torch.equal(d.generate(q, **gen), want), f"question of {q.shape[1]} tokens"
        c_doc, _ = d.prefill(q)
        c_ref = SnapKVCache(model, **kw)
        with torch.no_grad():
            model(full, **cache_kwargs(model, c_ref))
        for a, b in zip(c_doc.layers, c_ref.layers):
            assert torch.equal(a.positions.sort(-1).values, b.positions.sort(-1).values)
    batch = d.generate(qs, max_new_tokens=5)
    for q, row in zip(qs, batch):
        assert row == d.generate(q, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, :len(row)].tolist()
    d.save(tmp_path / "doc")
    back = SnapKVDocument.load(model, tmp_path / "doc")
    assert repr(back.config.policy) == repr(d.config.policy)
    assert torch.equal(back.generate(qs[0], **gen), d.generate(qs[0], **gen))


def test_a_custom_policy_is_not_saved_with_a_document(tmp_path):
    from snapkv_ext import SnapKVDocument
    from snapkv_ext.policies import AdaKV

    class Mine(AdaKV):
        pass

    d = SnapKVDocument(tiny_model("llama", layers=2), prompt(100), max_capacity_prompt=32, window_size=8,
                       policy=Mine())
    with pytest.raises(ValueError, match="cannot be saved with a document"):
        d.save(tmp_path / "doc")


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_layer_major_prefill_equals_one_shot(arch):
    from snapkv_ext.prefill import prefill

    model = tiny_model(arch, layers=3)
    ids = prompt(300, batch=2, seed=9)
    kw = dict(max_capacity_prompt=64, window_size=16, kernel_size=5, policy="ada-pyramidkv")
    ref = SnapKVCache(model, **kw)
    with torch.no_grad():
        want = model(ids, logits_to_keep=1, **cache_kwargs(model, ref)).logits[:, -1]
    cache = SnapKVCache(model, **kw)
    got = prefill(model, ids, cache, chunk_size=70)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for i, (a, b) in enumerate(zip(cache.layers, ref.layers)):
        assert torch.equal(a.positions.sort(-1).values, b.positions.sort(-1).values), f"layer {i}"
    nxt = want.argmax(-1, keepdim=True)
    with torch.no_grad():  # decoding continues from the same ragged store
        a = model(nxt, **cache_kwargs(model, cache)).logits[:, -1]
        b = model(nxt, **cache_kwargs(model, ref)).logits[:, -1]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
