"""Layer-major chunked prefill (snapkv_ext.prefill): the cache it leaves equals one-shot SnapKV,
layer by layer, for every family; the logits and the tokens generated after it equal one-shot's;
memory arithmetic; every bad input refused in one line, with the model and cache left usable."""
import pytest
import torch

from conftest import DEVICES, greedy, left_pad, prompt
from snapkv_ext import SnapKVCache
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.document import SnapKVDocument
from snapkv_ext.layers import SnapKVLayer, _segment_index
from snapkv_ext.prefill import chunk_spans, prefill, prefill_memory
from snapkv_ext.tools.models import TINY_CONFIGS, tiny_model

SETTINGS = dict(max_capacity_prompt=64, window_size=16, kernel_size=5)


def one_shot(model, ids, mask=None, **settings):
    cache = SnapKVCache(model, **(settings or SETTINGS))
    kw = {} if mask is None else dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1))
    with torch.no_grad():
        logits = model(ids, use_cache=True, logits_to_keep=1, **kw, **cache_kwargs(model, cache)).logits[:, -1]
    return cache, logits


def _keys_by_position(layer):
    """A layer's kept keys, each (row, KV head)'s in position order, and their positions: from the
    dense buffer, or the ragged store's segments (padded with zeros and position -1 at the end)."""
    if getattr(layer, "ragged", False):
        flat = layer.flat
        B, H = flat.lengths.shape
        seg, inner = _segment_index(flat.lengths.flatten())
        held, _, pos = flat.held()
        order = torch.argsort(seg * (int(pos.max()) + 1) + pos)
        n = int(flat.lengths.max())
        keys = held.new_zeros(B * H, n, held.shape[1])
        p = pos.new_full((B * H, n), -1)
        keys[seg, inner], p[seg, inner] = held[order], pos[order]
        return keys.view(B, H, n, -1), p.view(B, H, n)
    ps = layer.positions.sort(-1)
    return layer.keys.gather(2, ps.indices[..., None].expand(-1, -1, -1, layer.keys.shape[-1])), ps.values


def assert_same_cache(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert x.held_entries() == y.held_entries(), f"layer {i}"
        (kx, px), (ky, py) = _keys_by_position(x), _keys_by_position(y)
        assert torch.equal(px, py), f"layer {i}: kept positions differ"
        # float32 rounding relative to the keys' scale: chunks sum attention in another order
        torch.testing.assert_close(kx, ky, rtol=1e-4, atol=1e-5 * max(1.0, ky.abs().max().item()))


# 290: the last chunk gives way to the window; 512: one chunk
CASES = [(arch, 300, 70) for arch in sorted(TINY_CONFIGS)] + [
    (arch, L, chunk) for arch in ("llama", "qwen2-sliding", "gemma2") for L, chunk in ((290, 70), (300, 512))]


@pytest.mark.filterwarnings("ignore:SnapKVCache. every layer")
@pytest.mark.parametrize("arch,L,chunk", CASES)
def test_same_selection_and_logits_as_one_shot(arch, L, chunk):
    model = tiny_model(arch, layers=3)
    ids = prompt(L, batch=2, seed=L)
    ref, ref_logits = one_shot(model, ids)
    cache = SnapKVCache(model, **SETTINGS)
    logits = prefill(model, ids, cache, chunk_size=chunk)
    assert_same_cache(ref, cache)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert cache.stats()["compressions"] == ref.stats()["compressions"]


def test_chunk_spans():
    assert chunk_spans(300, 70, 16) == [(0, 70), (70, 140), (140, 210), (210, 280), (280, 300)]
    assert chunk_spans(290, 70, 16) == [(0, 70), (70, 140), (140, 210), (210, 274), (274, 290)]
    assert chunk_spans(50, 70, 16) == [(0, 50)]
    assert chunk_spans(140, 70, 16) == [(0, 70), (70, 140)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_continues_exactly(arch):
    """prefill, then model.generate on the prompt plus the first token: the tokens of one-shot
    SnapKV generate(), for a left-padded batch (each row as if alone)."""
    model = tiny_model(arch, layers=3)
    ids, mask = left_pad([prompt(260, seed=1), prompt(200, seed=2)])
    want = greedy(model, ids, SnapKVCache(model, **SETTINGS), n=10, attention_mask=mask)
    cache = SnapKVCache(model, **SETTINGS)
    logits = prefill(model, ids, cache, chunk_size=64, attention_mask=mask)
    first = logits.argmax(-1, keepdim=True)
    rest = greedy(model, torch.cat([ids, first], 1), cache, n=9,
                  attention_mask=torch.cat([mask, torch.ones_like(first)], 1))
    assert torch.equal(torch.cat([first, rest], 1), want)


def test_compression_ratio_counts_the_whole_prompt():
    model = tiny_model("llama", layers=2)
    ids = prompt(400)
    ref, _ = one_shot(model, ids, compression_ratio=0.25, window_size=16)
    cache = SnapKVCache(model, compression_ratio=0.25, window_size=16)
    prefill(model, ids, cache, chunk_size=100)
    assert cache.stats()["physical_length"] == [100, 100]
    assert_same_cache(ref, cache)


def test_prompt_within_budget_is_kept_whole():
    model = tiny_model("llama", layers=2)
    ids = prompt(60)
    cache = SnapKVCache(model, **SETTINGS)
    prefill(model, ids, cache, chunk_size=16)
    assert cache.stats()["physical_length"] == [60, 60] and cache.stats()["compressions"] == [0, 0]
    assert torch.equal(cache.kept_positions(0)[0, 0], torch.arange(60))


def test_memory_arithmetic_matches_what_is_held():
    """The compressed cache part is what the cache allocates, to the byte; the prefill peak the cache
    records (all layers held + the one full layer in flight) is within the formula's cache + layer_kv."""
    model = tiny_model("llama", layers=3)
    ids = prompt(500, batch=2)
    cache = SnapKVCache(model, **SETTINGS)
    parts = prefill_memory(model, cache, 2, 500, 128)
    prefill(model, ids, cache, chunk_size=128)
    st = cache.stats()
    assert st["allocated_bytes"] == parts["cache"]
    per_entry = 2 * 2 * 2 * 16 * 4  # k+v, batch, KV heads, head_dim, float32
    assert parts["layer_kv"] == per_entry * (500 + SETTINGS.get("decode_reserve", 128))
    assert parts["hidden"] == 2 * 500 * 64 * 4
    assert st["peak_prefill_bytes"] == parts["cache"] + parts["layer_kv"]


def test_not_enough_memory_is_refused_before_starting(monkeypatch):
    import snapkv_ext.prefill as pf

    model = tiny_model("llama", layers=2)
    cache = SnapKVCache(model, **SETTINGS)
    monkeypatch.setattr(pf, "_free_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match=r"prefill of 300 tokens needs about .* but 0.00 GiB is free") as e:
        prefill(model, prompt(300), cache, chunk_size=64)
    assert "\n" not in str(e.value)
    assert cache.get_seq_length() == 0
    prefill(model, prompt(300), cache, chunk_size=64, check_memory=False)
    assert cache.get_seq_length() == 300


def test_longer_than_the_model_allows():
    model = tiny_model("llama", layers=2)
    model.config.max_position_embeddings = 256
    with pytest.raises(ValueError, match=r"300 tokens, more than the model's max_position_embeddings \(256\); "
                                         "pass allow_longer=True"):
        prefill(model, prompt(300), SnapKVCache(model, **SETTINGS))
    ref, ref_logits = one_shot(model, prompt(300))
    cache = SnapKVCache(model, **SETTINGS)
    logits = prefill(model, prompt(300), cache, chunk_size=100, allow_longer=True)
    assert_same_cache(ref, cache)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_bad_input_one_line_and_nothing_changed():
    model = tiny_model("llama", layers=2)
    other = tiny_model("llama", layers=2)
    ids = prompt(100)
    layers_before = list(model.model.layers)
    cases = [
        (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
        (dict(chunk_size=8), "chunk_size must be at least window_size (16)"),
        (dict(cache=SnapKVCache(other, **SETTINGS)), "built for another model"),
        (dict(input_ids=ids.float()), "input_ids must be a [batch, length] int64 tensor"),
        (dict(input_ids=ids[0]), "input_ids must be a [batch, length] int64 tensor"),
        (dict(attention_mask=torch.ones(1, 99)), "attention_mask must be [batch, length] = (1, 100)"),
        (dict(attention_mask=torch.cat([torch.ones(1, 90), torch.zeros(1, 10)], 1)), "left padding only"),
        (dict(cache=torch.zeros(1)), "cache must be a SnapKVCache, got Tensor"),
    ]
    for kw, message in cases:
        args = dict(input_ids=ids, cache=SnapKVCache(model, **SETTINGS), chunk_size=32)
        args.update(kw)
        with pytest.raises(ValueError) as e:
            prefill(model, args.pop("input_ids"), args.pop("cache"), **args)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    used = SnapKVCache(model, **SETTINGS)
    prefill(model, ids, used, chunk_size=32)
    with pytest.raises(ValueError, match="prefill needs an empty cache"):
        prefill(model, ids, used, chunk_size=32)
    doc = SnapKVDocument(model, ids, **SETTINGS)
    with pytest.raises(ValueError, match="cache must be a SnapKVCache, got DocumentCache"):
        prefill(model, prompt(20), doc.cache_for(), chunk_size=32)
    assert list(model.model.layers) == layers_before


def test_error_midway_restores_the_model_and_empties_the_cache():
    model = tiny_model("llama", layers=3)
    ids = prompt(200)
    layers_before = list(model.model.layers)
    cache = SnapKVCache(model, **SETTINGS)

    def stop(layer, done, total):
        if layer == 1 and done > 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prefill(model, ids, cache, chunk_size=64, progress=stop)
    assert list(model.model.layers) == layers_before
    assert cache.get_seq_length() == 0 and all(lay.held_entries() == 0 for lay in cache.layers)
    assert all(lay.prompt_length is None for lay in cache.layers if isinstance(lay, SnapKVLayer))
    # the same cache and model work afterwards, exactly
    seen = []
    logits = prefill(model, ids, cache, chunk_size=64, progress=lambda *a: seen.append(a))
    ref, ref_logits = one_shot(model, ids)
    assert_same_cache(ref, cache)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert seen == [(i, e, 200) for i in range(3) for e in (64, 128, 184, 200)]  # the last chunk holds the window


def test_smollm2_same_as_one_shot():
    from snapkv_ext.tools.haystack import chat_ids, needle_case
    from snapkv_ext.tools.models import smollm2

    model, tok = smollm2()
    case = needle_case(tok, 1500, 0.4, seed=3)
    ids = chat_ids(tok, case.prompt)
    settings = dict(max_capacity_prompt=256, window_size=32, kernel_size=7)
    ref = SnapKVCache(model, **settings)
    want = greedy(model, ids, ref, n=8)
    cache = SnapKVCache(model, **settings)
    logits = prefill(model, ids, cache, chunk_size=512)
    first = logits.argmax(-1, keepdim=True)
    rest = greedy(model, torch.cat([ids, first], 1), cache, n=7)
    assert torch.equal(torch.cat([first, rest], 1), want)
    ref2, _ = one_shot(model, ids, **settings)
    cache2 = SnapKVCache(model, **settings)
    prefill(model, ids, cache2, chunk_size=512)
    assert_same_cache(ref2, cache2)


# ---- documents: read layer-major, saved and loaded


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_document_read_layer_major_equals_one_shot(arch):
    model = tiny_model(arch, layers=3)
    doc_ids, q = prompt(300, seed=5), prompt(20, seed=6)
    a = SnapKVDocument(model, doc_ids, **SETTINGS)
    b = SnapKVDocument(model, doc_ids, chunk_size=64, **SETTINGS)
    for ka, kb, va, vb, qa, qb in zip(a.keys, b.keys, a.values, b.values, a.q_tails, b.q_tails):
        assert ka.shape == kb.shape and qa.shape == qb.shape
        torch.testing.assert_close(kb, ka, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(qb, qa, rtol=1e-4, atol=1e-5)
    assert torch.equal(b.generate(q, max_new_tokens=6), a.generate(q, max_new_tokens=6))
    with pytest.raises(ValueError, match=r"chunk_size must be an integer of at least window_size \(16\)"):
        SnapKVDocument(model, doc_ids, chunk_size=8, **SETTINGS)


def test_document_save_and_load(tmp_path):
    model = tiny_model("llama", layers=2)
    doc_ids, q = prompt(200, seed=7), prompt(12, seed=8)
    doc = SnapKVDocument(model, doc_ids, chunk_size=64, **SETTINGS)
    path = tmp_path / "doc.pt"
    doc.save(str(path))
    loaded = SnapKVDocument.load(model, str(path))
    assert loaded.config == doc.config and loaded.length == 200
    assert torch.equal(loaded.generate(q, max_new_tokens=6), doc.generate(q, max_new_tokens=6))
    other = tiny_model("llama", layers=2, seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match=r"this document was read by another model \(weights: saved"):
        SnapKVDocument.load(other, str(path))
    with pytest.raises(ValueError, match=r"this document was read by another model \(layers: saved 2"):
        SnapKVDocument.load(tiny_model("llama", layers=3), str(path))
    (tmp_path / "junk.pt").write_bytes(b"not a document")
    with pytest.raises(ValueError, match="path: cannot read a saved document from"):
        SnapKVDocument.load(model, str(tmp_path / "junk.pt"))
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a document saved by SnapKVDocument.save"):
        SnapKVDocument.load(model, str(tmp_path / "other.pt"))


@pytest.mark.parametrize("device", DEVICES)
def test_hidden_states_kept_on_the_cpu(device):
    """hidden_device="cpu": the hidden states in (pinned, with a GPU model) CPU memory, streamed per
    chunk: the same selection and logits."""
    model = tiny_model("qwen2-sliding", layers=3).to(device)
    ids = prompt(300, batch=2).to(device)
    ref, ref_logits = one_shot(model, ids)
    cache = SnapKVCache(model, **SETTINGS)
    logits = prefill(model, ids, cache, chunk_size=70, hidden_device="cpu")
    assert_same_cache(ref, cache)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


# ---- the chunk attention without a mask (routing.chunk_attention)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("Hq,Hkv,c,L,Dv", [(4, 2, 7, 7, 16), (4, 2, 5, 37, 16), (6, 3, 33, 100, 16), (2, 2, 1, 9, 16),
                                           (4, 2, 5, 37, 24)])  # V's head size differs: the masked way
def test_chunk_attention_equals_masked_attention(Hq, Hkv, c, L, Dv, dtype, tol):
    """The chunk's queries at positions L-c..L-1 over the keys so far, as the model's masked SDPA
    computes them in float64 (GQA by repeating the KV heads), on a strided key buffer."""
    from snapkv_ext.routing import chunk_attention

    g = torch.Generator().manual_seed(L * 7 + c)
    B, D = 2, 16
    q = torch.randn(B, Hq, c, D, generator=g).to(dtype)
    kbuf = torch.randn(B, Hkv, L + 5, D, generator=g).to(dtype)  # held in a longer buffer
    vbuf = torch.randn(B, Hkv, L + 5, Dv, generator=g).to(dtype)
    k, v = kbuf[:, :, :L], vbuf[:, :, :L]
    out = chunk_attention(q, k, v, 0.3)
    assert out.shape == (B, Hq, c, Dv) and out.dtype == dtype
    mask = torch.arange(L)[None] <= torch.arange(L - c, L)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(Hq // Hkv, 1), v.double().repeat_interleave(Hq // Hkv, 1),
        attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_prefill_runs_unmasked_chunks_where_it_applies(monkeypatch):
    """A GQA llama on SDPA: every layer's chunks run routing.chunk_attention and no mask is built
    for them; the model is as it was after (not routed). A left-padded batch and a soft-capped
    model (eager attention) run the model's own masked attention."""
    import snapkv_ext.routing as routing
    from snapkv_ext.prefill import unmasked_layers

    calls = []
    real = routing.chunk_attention
    monkeypatch.setattr(routing, "chunk_attention", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    model = tiny_model("llama", layers=3)
    assert unmasked_layers(model) == {0, 1, 2}
    cache = SnapKVCache(model, **SETTINGS)
    prefill(model, prompt(300, batch=2), cache, chunk_size=70)
    assert calls == [70, 140, 210, 280, 300] * 3
    assert model.config._attn_implementation == "sdpa"
    ids, mask = left_pad([prompt(260, seed=1), prompt(200, seed=2)])
    assert unmasked_layers(model, mask) == set() and unmasked_layers(model, torch.ones_like(ids)) == {0, 1, 2}
    assert unmasked_layers(tiny_model("gemma2", layers=2)) == set()
    assert unmasked_layers(tiny_model("gemma3", layers=2)) == {1}  # layer 0 slides
    calls.clear()
    prefill(model, ids, SnapKVCache(model, **SETTINGS), chunk_size=64, attention_mask=mask)
    assert calls == []
