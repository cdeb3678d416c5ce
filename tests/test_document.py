"""SnapKVDocument: a document read once, each question re-selected with its own window, equal to
SnapKVCache on document + question from scratch, without ever re-reading the document."""
import pytest
import torch

from snapkv_ext import SnapKVCache, SnapKVDocument
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.tools.haystack import facts_document
from snapkv_ext.tools.models import smollm2, tiny_model

KW = dict(max_capacity_prompt=64, window_size=8, kernel_size=5)


def ids(n, seed):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def scratch(model, doc, q, n_new, **kw):
    """SnapKVCache on document + question from scratch: (new tokens, cache after prefill)."""
    full = torch.cat([doc, q], dim=1)
    c = SnapKVCache(model, **kw)
    with torch.no_grad():
        model(full, **cache_kwargs(model, c))
        out = model.generate(full, attention_mask=torch.ones_like(full), **cache_kwargs(model, SnapKVCache(model, **kw)),
                             max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[:, full.shape[1]:], c


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_equals_snapkv_from_scratch(arch):
    model = tiny_model(arch, layers=2, heads=6, kv_heads=2)
    doc = ids(300, 0)
    d = SnapKVDocument(model, doc, **KW)
    for seed, qlen in [(1, 30), (2, 12), (3, 3)]:  # longer and shorter than the window
        q = ids(qlen, seed)
        want, c_ref = scratch(model, doc, q, 6, **KW)
        got = d.generate(q, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        c_doc, _ = d.prefill(q)
        for a, b in zip(c_doc.layers, c_ref.layers):
            assert torch.equal(a.positions, b.positions), "same kept positions per layer and KV head"
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        assert c_doc.get_seq_length() == 300 + qlen


def test_document_is_never_recomputed_and_memory_is_bounded():
    model = tiny_model("llama", layers=3, heads=4, kv_heads=2)
    doc = ids(400, 0)
    d = SnapKVDocument(model, doc, max_capacity_prompt=64, window_size=8, decode_reserve=4)
    seen = []
    attn = [m for m in model.modules() if hasattr(m, "q_proj")]
    h = attn[0].register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]),
                                          with_kwargs=True)
    try:
        c, _ = d.prefill(ids(20, 1))
    finally:
        h.remove()
    assert seen == [20], "only the question's tokens go through the model"
    # Resident KV during the question's prefill: the budget of every layer plus one layer's full
    # KV (document + question), never the whole document.
    one_full = 2 * 1 * 2 * (400 + 20) * 16 * 4
    budget_all = 3 * 2 * 1 * 2 * (64 + 4) * 16 * 4
    assert c.stats()["peak_prefill_bytes"] <= budget_all + one_full
    assert c.stats()["physical_length"] == [64, 64, 64]
    assert all(k.device.type == "cpu" for k in d.keys), "the document's full KV stays in the store"


def test_chat_continues_over_the_whole_conversation():
    """After a question and its answer are appended, the next question sees document + question
    + answer in full and re-selects: equal to SnapKVCache on the whole conversation from scratch."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    doc, q1, q2 = ids(260, 0), ids(20, 1), ids(15, 2)
    d = SnapKVDocument(model, doc, **KW)
    a1 = d.generate(q1, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    d.append(torch.cat([q1, a1], dim=1))
    assert d.length == 260 + 20 + 5 and d.keys[0].shape[2] == 285
    history = torch.cat([doc, q1, a1], dim=1)
    want, c_ref = scratch(model, history, q2, 5, **KW)
    assert torch.equal(d.generate(q2, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0), want)
    c_doc, _ = d.prefill(q2)
    for a, b in zip(c_doc.layers, c_ref.layers):
        assert torch.equal(a.positions, b.positions)


def test_batch_of_questions_equals_each_alone():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    doc = ids(250, 0)
    d = SnapKVDocument(model, doc, **KW)
    qs = [ids(25, 1), ids(4, 2), ids(40, 3)]
    batch = d.generate(qs, max_new_tokens=5)
    for q, got in zip(qs, batch):
        alone = d.generate(q, max_new_tokens=5, do_sample=False, pad_token_id=0)
        n = min(len(got), alone.shape[1])
        assert got[:n] == alone[0, :n].tolist()


def test_bad_input():
    model, other = tiny_model("llama"), tiny_model("llama", seed=3)
    d = SnapKVDocument(model, ids(100, 0), max_capacity_prompt=32, window_size=8, max_question_tokens=50)
    with pytest.raises(ValueError, match="question_ids is empty"):
        d.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than max_question_tokens"):
        d.generate(ids(51, 1))
    with pytest.raises(ValueError, match="tensor of token ids"):
        d.generate(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="read by another model"):
        d.cache_for(other)
    with pytest.raises(ValueError, match="built for another model"):
        with torch.no_grad():
            other(ids(20, 2), **cache_kwargs(other, d.cache_for()))
    with pytest.raises(ValueError, match="must be longer than window_size"):
        SnapKVDocument(model, ids(8, 0), max_capacity_prompt=32, window_size=8)
    with pytest.raises(ValueError, match="must be \\[L\\] or \\[1, L\\]"):
        SnapKVDocument(model, ids(8, 0).expand(2, 8), max_capacity_prompt=32, window_size=4)
    with pytest.raises(ValueError, match="larger than window_size"):
        SnapKVDocument(model, ids(100, 0), max_capacity_prompt=8, window_size=8)


def test_five_questions_on_smollm2():
    """Five questions, five different facts, one document read once, 25% kept: as many right as
    SnapKV from scratch on each document + question (and the same answers)."""
    model, tok = smollm2()
    doc, questions = facts_document(tok, 2000)
    kw = dict(compression_ratio=0.25, window_size=16, kernel_size=5)
    d = SnapKVDocument(model, doc, **kw)
    ours = ref = 0
    for q, answer in questions:
        a = tok.decode(d.generate(q, max_new_tokens=16, do_sample=False)[0], skip_special_tokens=True)
        full = torch.cat([doc, q], dim=1)
        with torch.no_grad():
            out = model.generate(full, attention_mask=torch.ones_like(full), **cache_kwargs(model, SnapKVCache(model, **kw)),
                                 max_new_tokens=16, do_sample=False)
        b = tok.decode(out[0, full.shape[1]:], skip_special_tokens=True)
        assert a == b
        if answer == questions[0][1]:  # per layer and KV head, the same entries are kept
            c_doc, _ = d.prefill(q)
            c_ref = SnapKVCache(model, **kw)
            with torch.no_grad():
                model(full, **cache_kwargs(model, c_ref))
            same = sum(torch.equal(x.positions, y.positions) for x, y in zip(c_doc.layers, c_ref.layers))
            assert same == len(c_ref.layers), f"{same}/{len(c_ref.layers)} layers keep the same positions"
        ours += answer in a
        ref += answer in b
    assert ours >= ref and ours >= 3, f"{ours}/5 right (from scratch {ref}/5)"


def test_one_reading_for_many_settings():
    """cache_for(config=...): one document read, each setting (budget, policy, pooling) equal to its
    own SnapKVCache from scratch; the evaluation's read-once path gives the same tokens."""
    from snapkv_ext import SnapKVConfig
    from snapkv_ext.tools.evaluate import Method, _read_once, generate

    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids_all = ids(300, 0)
    methods = [Method("a", compression_ratio=0.2, window_size=8, kernel_size=5),
               Method("b", max_capacity_prompt=48, window_size=4, kernel_size=3, policy="adakv"),
               Method("c", compression_ratio=0.1, window_size=8, pooling="avg", policy="ada-pyramidkv")]
    doc = _read_once(model, ids_all, methods)
    assert doc.length == 300 - 16
    for m in methods:
        want = generate(model, None, ids_all, m, max_new_tokens=6).tokens
        assert generate(model, None, ids_all, m, max_new_tokens=6, document=doc).tokens == want, m.name
    with pytest.raises(ValueError, match="window_size 16 is larger than the document's"):
        doc.cache_for(config=SnapKVConfig(max_capacity_prompt=64, window_size=16))
    with pytest.raises(ValueError, match="config must be a SnapKVConfig"):
        doc.cache_for(config={"window_size": 8})
