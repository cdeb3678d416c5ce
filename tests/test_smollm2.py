"""SnapKVCache on the real SmolLM2-135M-Instruct (GQA 9/3, 30 layers), on CPU: exactness when
nothing is dropped, a left-padded batch, and pass-key retrieval at 25% of the prompt."""
import pytest
import torch
from transformers import DynamicCache

from snapkv_ext import SnapKVCache
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.tools.haystack import chat_ids, needle_case, retrieved
from snapkv_ext.tools.models import smollm2


@pytest.fixture(scope="module")
def model_tok():
    return smollm2()


def generate(model, ids, cache, n=12, mask=None):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                             **cache_kwargs(model, cache), max_new_tokens=n, do_sample=False)
    return out[:, ids.shape[1]:]


def test_exact_when_the_prompt_fits(model_tok):
    model, tok = model_tok
    ids = chat_ids(tok, needle_case(tok, 400, 0.5).prompt)
    assert torch.equal(generate(model, ids, SnapKVCache(model, max_capacity_prompt=1024)),
                       generate(model, ids, DynamicCache()))
    with torch.no_grad():
        a = model(ids, **cache_kwargs(model, DynamicCache())).logits
        c = SnapKVCache(model, max_capacity_prompt=1024)
        b = model(ids, **cache_kwargs(model, c)).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert c.stats()["compressions"] == [0] * 30


def test_gqa_compressed_cache_shape(model_tok):
    model, tok = model_tok
    ids = chat_ids(tok, needle_case(tok, 800, 0.3).prompt)
    c = SnapKVCache(model, max_capacity_prompt=200, window_size=16, kernel_size=5)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, c))
    st = c.stats()
    assert st["physical_length"] == [200] * 30 and st["logical_length"] == ids.shape[1]
    assert c.layers[0].keys.shape == (1, 3, 200, 64)  # 3 KV heads: selection per KV head
    assert st["kv_bytes"] == 30 * 2 * 3 * 200 * 64 * 4


def test_left_padded_batch_equals_rows_alone(model_tok):
    model, tok = model_tok
    texts = [needle_case(tok, n, 0.4, seed=i).prompt for i, n in enumerate([600, 350, 120])]
    enc = tok.apply_chat_template([[{"role": "user", "content": t}] for t in texts], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True, padding=True)
    kw = dict(max_capacity_prompt=192, window_size=16, kernel_size=5)
    batch = generate(model, enc["input_ids"], SnapKVCache(model, **kw), n=10, mask=enc["attention_mask"])
    for i, t in enumerate(texts):
        alone = generate(model, chat_ids(tok, t), SnapKVCache(model, **kw), n=10)
        assert torch.equal(batch[i], alone[0]), f"row {i}: {tok.decode(batch[i])!r} vs {tok.decode(alone[0])!r}"


def test_pass_key_retrieval_at_25_percent(model_tok):
    """Budget 25% of the prompt: at least as many retrievals as the full cache minus one (three
    lengths, the key early and late; the depth sweep itself is benchmarks/RESULTS.md's)."""
    model, tok = model_tok
    full = snap = 0
    for n in (1000, 2000, 4000):
        for depth in (0.2, 0.8):
            case = needle_case(tok, n, depth)
            ids = chat_ids(tok, case.prompt)
            full += retrieved(tok.decode(generate(model, ids, DynamicCache(), n=14)[0]), case.answer)
            c = SnapKVCache(model, compression_ratio=0.25, window_size=16, kernel_size=5)
            out = generate(model, ids, c, n=14)
            snap += retrieved(tok.decode(out[0]), case.answer)
            # ceil(25% of the prompt) kept, plus the generated tokens but the last (not yet fed back).
            assert c.stats()["physical_length"][0] == -(-ids.shape[1] // 4) + out.shape[1] - 1
    assert full >= 5, f"the full cache itself retrieved only {full}/6"
    assert snap >= full - 1, f"SnapKV at 25% retrieved {snap}/6, the full cache {full}/6"
