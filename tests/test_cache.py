"""SnapKVCache on small random-weight models of every supported architecture: drop-in use,
exactness when nothing is dropped, GQA-aware selection, layer-by-layer compression, positions,
left-padded batches, several turns, concurrency and bad input."""
import copy
import gc
import threading
import weakref

import pytest
import torch
from transformers import DynamicCache

from conftest import greedy, left_pad, prompt
from snapkv_ext import SnapKVCache, SnapKVConfig, reference
from snapkv_ext.adapters import attention_layers
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.tools.models import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
ATTN = ["sdpa", "eager"]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", ARCHS)
def test_drop_in_generate_and_exact_when_it_fits(arch, attn):
    model = tiny_model(arch, attn_implementation=attn)
    ids = prompt(60)
    full = greedy(model, ids, DynamicCache())
    # Budget above the prompt: nothing is dropped, the output is token-identical.
    fits = SnapKVCache(model, max_capacity_prompt=100, window_size=8, kernel_size=3)
    assert torch.equal(greedy(model, ids, fits), full)
    assert fits.stats()["compressions"] == [0, 0]
    # Budget below the prompt: compressed, generation still runs, cache holds the budget.
    small = SnapKVCache(model, max_capacity_prompt=24, window_size=8, kernel_size=3)
    out = greedy(model, ids, small)
    assert out.shape == full.shape
    st = small.stats()
    assert st["logical_length"] == 60 + 7 and st["compressions"] == [1, 1]
    assert st["physical_length"] == [24 + 7, 24 + 7]


@pytest.mark.parametrize("api", ["SnapKVCache", "SnapKVDocument"])
def test_arguments_are_the_config_settings(api):
    """SnapKVCache's and SnapKVDocument's setting arguments have SnapKVConfig's names and defaults
    (config.py declares them once; a default changed there and not here fails)."""
    import inspect
    from dataclasses import fields

    import snapkv_ext

    params = inspect.signature(getattr(snapkv_ext, api)).parameters
    settings = {f.name: f.default for f in fields(SnapKVConfig)}
    shared = [n for n in params if n in settings]
    assert {"max_capacity_prompt", "compression_ratio", "window_size", "kernel_size", "pooling", "policy", "scorer",
            "max_capacity_decode", "decode_interval", "decode_reserve", "group_reduce"} <= set(shared)
    for name in shared:
        assert params[name].default == settings[name], (api, name)


def test_sampling_runs():
    model = tiny_model("llama")
    ids = prompt(50)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=20, max_new_tokens=6,
                             **cache_kwargs(model, SnapKVCache(model, max_capacity_prompt=20, window_size=4)), pad_token_id=0)
    assert out.shape == (1, 56)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_dynamic_cache_when_it_fits(arch):
    """A plain forward loop (prefill then steps) gives the same logits as DynamicCache."""
    model = tiny_model(arch)
    ids = prompt(40)
    caches = [DynamicCache(), SnapKVCache(model, max_capacity_prompt=64, window_size=8)]
    logits = []
    with torch.no_grad():
        for c in caches:
            out = [model(ids, **cache_kwargs(model, c)).logits[:, -1]]
            for t in range(3):
                out.append(model(torch.tensor([[5 + t]]), **cache_kwargs(model, c)).logits[:, -1])
            logits.append(torch.stack(out))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_gqa_heads_positions_and_layer_by_layer():
    model = tiny_model("llama", layers=3, heads=6, kv_heads=2)
    ids = prompt(200)
    cache = SnapKVCache(model, max_capacity_prompt=48, window_size=8, kernel_size=5, decode_reserve=8)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, 48, 16), "the cache holds H_kv heads, never repeated ones"
        pos = layer.positions
        assert (pos[..., 1:] > pos[..., :-1]).all(), "kept entries are in position order"
        assert torch.equal(pos[..., -8:], torch.arange(192, 200).expand(1, 2, 8)), "the window is kept"
    assert cache.get_seq_length() == 200
    assert cache.get_mask_sizes(1, 0) == (49, 200 - 48)
    # Layer by layer: during prefill at most one full layer plus the compressed rest existed.
    one_full = 2 * 1 * 2 * 200 * 16 * 4
    compressed_all = sum(layer.allocated_bytes() for layer in cache.layers)
    assert cache.stats()["peak_prefill_bytes"] <= one_full + compressed_all
    assert compressed_all == 3 * 2 * 1 * 2 * (48 + 8) * 16 * 4
    # A DynamicCache holds 3 full layers at the end of prefill; this cache never held 2.
    assert cache.stats()["peak_prefill_bytes"] < 2 * one_full


def test_decoding_equals_attention_over_kept_entries():
    """After compression, a decoding step equals one over a cache built by hand from the
    reference pipeline (full prefill, reference selection per layer, new token at position L)."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    L, C, w = 120, 40, 8
    ids = prompt(L)
    captured = {}
    attention = {id(a.module): a for a in attention_layers(model)}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = attention[id(module)].window_queries(kwargs["hidden_states"],
                                                                          kwargs["position_embeddings"], w)

    handles = [a.module.register_forward_pre_hook(grab, with_kwargs=True) for a in attention.values()]
    with torch.no_grad():
        full = DynamicCache()
        model(ids, **cache_kwargs(model, full))
    for h in handles:
        h.remove()
    by_hand = DynamicCache()
    for i, layer in enumerate(full.layers):
        k, v, _ = reference.snapkv_compress(captured[i], layer.keys, layer.values, C, 7, "max")
        by_hand.update(k, v, i)
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        want = model(nxt, **cache_kwargs(model, by_hand), position_ids=torch.tensor([[L]])).logits
        snap = SnapKVCache(model, max_capacity_prompt=C, window_size=w, kernel_size=7)
        model(ids, **cache_kwargs(model, snap))
        got = model(nxt, **cache_kwargs(model, snap)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for i, layer in enumerate(snap.layers):
        assert torch.equal(layer.keys[:, :, :C], by_hand.layers[i].keys[:, :, :C])


@pytest.mark.parametrize("attn", ATTN)
def test_left_padded_batch_rows_equal_rows_alone(attn):
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, attn_implementation=attn)
    lens = [150, 90, 30]  # the last row is shorter than the budget
    rows = [prompt(n, seed=i) for i, n in enumerate(lens)]
    L = max(lens)
    ids, mask = left_pad(rows)
    kw = dict(max_capacity_prompt=40, window_size=8, kernel_size=5)
    batch_cache = SnapKVCache(model, **kw)
    out = greedy(model, ids, batch_cache, n=6, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = greedy(model, r, SnapKVCache(model, **kw), n=6)
        assert torch.equal(out[i], alone[0]), f"row {i} differs from running it alone"
        pad = L - lens[i]
        pos = batch_cache.kept_positions(0)[i, :, :40]
        if lens[i] >= 40:
            assert (pos >= pad).all(), "padding is never kept while a row has enough tokens"


def test_document_once_many_questions_and_turns():
    """Compress a document once, then ask questions on copies without re-reading it; a chat turn
    appended to a compressed cache works and re-selection keeps the cache at the budget."""
    model = tiny_model("llama")
    doc = prompt(200)
    cache = SnapKVCache(model, max_capacity_prompt=48, window_size=8)
    seen = []
    h = [m.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["hidden_states"].shape[1]), with_kwargs=True)
         for m in model.modules() if hasattr(m, "q_proj")][:1]
    with torch.no_grad():
        model(doc, **cache_kwargs(model, cache))
    for q_seed in (1, 2):
        question = prompt(20, seed=q_seed)
        seen.clear()
        c = copy.deepcopy(cache)
        full_ids = torch.cat([doc, question], dim=1)
        out = greedy(model, full_ids, c, n=4)
        assert out.shape == (1, 4)
        assert seen[0] == 20, "only the question is run through the model, never the document"
        assert c.get_seq_length() == 200 + 20 + 3
        assert c.stats()["physical_length"][0] == 48 + 3, "the turn re-selected down to the budget"
    assert cache.get_seq_length() == 200, "the original compressed document is untouched"
    h[0].remove()
    # Without re-selection, a turn is appended.
    c = SnapKVCache(model, max_capacity_prompt=48, window_size=8, recompress=False)
    with torch.no_grad():
        model(doc, **cache_kwargs(model, c))
        model(prompt(20, seed=5), **cache_kwargs(model, c))
    assert c.stats()["physical_length"][0] == 68 and c.get_seq_length() == 220


def test_reference_flag_gives_the_same_cache():
    model = tiny_model("qwen2")
    ids = prompt(150)
    caches = [SnapKVCache(model, max_capacity_prompt=40, window_size=8, use_reference=flag) for flag in (False, True)]
    with torch.no_grad():
        for c in caches:
            model(ids, **cache_kwargs(model, c))
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_two_threads_two_caches_match_sequential():
    model = tiny_model("llama")
    ids = prompt(120)
    settings = [dict(max_capacity_prompt=30, window_size=8, kernel_size=3), dict(compression_ratio=0.5, window_size=4,
                                                                                 pooling="avg")]
    seq = [greedy(model, ids, SnapKVCache(model, **s), n=8) for s in settings]
    results = [None, None]

    def run(i):
        results[i] = greedy(model, ids, SnapKVCache(model, **settings[i]), n=8)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(seq, results):
        assert torch.equal(a, b)


def test_ratio_budget():
    model = tiny_model("llama")
    c = SnapKVCache(model, compression_ratio=0.25, window_size=8)
    with torch.no_grad():
        model(prompt(200), **cache_kwargs(model, c))
    assert c.stats()["physical_length"] == [50, 50]
    assert c.stats()["kv_bytes"] == 2 * 2 * 50 * 16 * 4 * 2  # layers * (k, v) * H_kv * C * D * fp32


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_capacity_prompt=8, window_size=8), "larger than window_size"),
    (dict(max_capacity_prompt=64, kernel_size=4), "positive odd"),
    (dict(max_capacity_prompt=64, pooling="median"), "pooling must be one of"),
    (dict(max_capacity_prompt=64, group_reduce="min"), "group_reduce must be one of"),
    (dict(max_capacity_prompt=64, compression_ratio=0.5), "not both"),
    (dict(max_capacity_prompt=None, compression_ratio=1.5), "compression_ratio must be in"),
    (dict(max_capacity_prompt=64, window_size=0), "window_size must be a positive"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnapKVConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        SnapKVCache(tiny_model("llama"), **kwargs)


def test_one_budget_default():
    """The default budget lives in one place: a ratio alone is a complete setting."""
    assert SnapKVConfig().max_capacity_prompt == 1024
    cfg = SnapKVConfig(compression_ratio=0.25)
    assert cfg.max_capacity_prompt is None and cfg.max_capacity_prompt_for(400) == 100
    c = SnapKVCache(tiny_model("llama"), compression_ratio=0.25, window_size=8)
    assert c.config == SnapKVConfig(compression_ratio=0.25, window_size=8)


def test_config_is_frozen_and_accepted():
    cfg = SnapKVConfig(max_capacity_prompt=64, window_size=8)
    with pytest.raises(Exception):
        cfg.window_size = 4
    c = SnapKVCache(tiny_model("llama"), config=cfg)
    assert c.config is cfg


def test_misuse_is_a_clear_error():
    m1, m2 = tiny_model("llama"), tiny_model("llama", seed=1)
    c = SnapKVCache(m1, max_capacity_prompt=20, window_size=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="built for another model"):
            m2(prompt(30), **cache_kwargs(m2, c))
        c = SnapKVCache(m1, max_capacity_prompt=20, window_size=4)
        m1(prompt(30, batch=2), **cache_kwargs(m1, c))
        with pytest.raises(ValueError, match="batch size changed from 2 to 1"):
            m1(prompt(1), **cache_kwargs(m1, c))


def test_unsupported_architecture():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="does not support GPT2LMHeadModel"):
        SnapKVCache(gpt2)


def test_repeated_generate_keeps_no_state():
    model = tiny_model("llama")
    ids = prompt(80)
    refs = []
    for _ in range(3):
        c = SnapKVCache(model, max_capacity_prompt=20, window_size=4)
        greedy(model, ids, c, n=4)
        assert all(lay._pending is None for lay in c.layers)
        refs.append(weakref.ref(c))
        del c
    gc.collect()
    assert all(r() is None for r in refs), "nothing (the model's hooks included) keeps a cache alive"
    hooks = [m for m in model.modules() if getattr(m, "_snapkv_hooked", False)]
    assert all(len(m._forward_pre_hooks) == 1 for m in hooks), "hooks are installed once per model"
