"""Every supported model family, scored with the model's own attention.

The oracle: run the model with eager attention and take the attention probabilities it computes
(its own scale, soft-cap, norms, masks) for the last w queries of the prompt; compute SnapKV's
votes, GQA reduction, pooling and top-k from them in float64; the cache must keep exactly those
positions, layer by layer. Sliding-window layers must hold exactly their window. Plus, for every
family: a budget above the prompt is token-identical to the model's own cache, left-padded rows
equal running them alone, and the cache stays bounded over turns.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import greedy, left_pad, prompt
from snapkv_ext import SnapKVCache, SnapKVDocument
from snapkv_ext.adapters import FAMILIES, attention_layers
from snapkv_ext.cache import cache_kwargs
from snapkv_ext.tools.models import TINY_CONFIGS, tiny_model

ARCHS = sorted(TINY_CONFIGS)
MIXED = [a for a in ARCHS if a.startswith("gemma") or a == "qwen2-sliding"]  # sliding and global layers
# (heads, kv_heads, head_dim): GQA; MQA with an odd head count; Gemma's head_dim 256.
SHAPES = [(4, 2, 16), (3, 1, 32), (2, 1, 256)]
L, W, C, K = 160, 8, 40, 5  # prompt, observation window, max_capacity_prompt, pooling kernel


def oracle_scores(probs: torch.Tensor, kv_heads: int, w: int, kernel: int) -> torch.Tensor:
    """SnapKV's pooled scores [H_kv, L - w] in float64 from the model's attention probabilities
    [H_q, L, L]: mean over the window's queries, mean over each GQA group, max-pool."""
    Hq, n, _ = probs.shape
    votes = probs.double()[:, n - w:, : n - w].mean(dim=1)
    votes = votes.view(kv_heads, Hq // kv_heads, n - w).mean(dim=1)
    return F.max_pool1d(votes[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]


def assert_same_selection(kept: torch.Tensor, scores: torch.Tensor, k: int, where: str) -> None:
    """kept [H_kv, k] positions vs the oracle's top-k of scores [H_kv, N]: equal, except that
    positions whose oracle scores tie at the threshold (within float32 rounding) may swap."""
    for h in range(scores.shape[0]):
        s = scores[h]
        order = sorted(range(s.shape[0]), key=lambda j: (-float(s[j]), j))
        want, got = set(order[:k]), set(kept[h].tolist())
        if want == got:
            continue
        thr = float(s[order[k - 1]])
        tol = 1e-5 * float(s.max())
        extra, missing = got - want, want - got
        assert all(float(s[j]) >= thr - tol for j in extra) and all(float(s[j]) <= thr + tol for j in missing), (
            f"{where}, KV head {h}: kept {sorted(extra)} instead of {sorted(missing)} "
            f"(scores {[round(float(s[j]), 6) for j in sorted(extra)]} vs {[round(float(s[j]), 6) for j in sorted(missing)]}, "
            f"threshold {thr:.6f})")


def test_every_family_has_a_test_config():
    covered = {TINY_CONFIGS[a][1] for a in ARCHS}
    for fam in FAMILIES:
        model_cls = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "olmo2": "Olmo2ForCausalLM",
                     "phi3": "Phi3ForCausalLM"}.get(fam.name, fam.attention[0].replace("Attention", "ForCausalLM"))
        assert model_cls in covered, f"family {fam.name} has no entry in TINY_CONFIGS"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}q{s[1]}kv{s[2]}d")
@pytest.mark.parametrize("arch", ARCHS)
def test_selection_equals_snapkv_on_the_models_own_attention(arch, shape):
    heads, kv_heads, head_dim = shape
    model = tiny_model(arch, layers=4, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       attn_implementation="eager")
    ids = prompt(L, seed=heads + head_dim)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mistral-sliding: every layer slides, said by a warning
        probs = model(ids, output_attentions=True, use_cache=False).attentions
        cache = SnapKVCache(model, max_capacity_prompt=C, window_size=W, kernel_size=K)
        model(ids, **cache_kwargs(model, cache))
    reference = DynamicCache(config=model.config)
    assert [lay.is_sliding for lay in cache.layers] == reference.is_sliding, "sliding layers as Transformers has them"
    for i, layer in enumerate(cache.layers):
        if layer.is_sliding:
            window = layer.sliding_window
            assert layer.keys.shape[2] == window - 1, "a sliding layer holds exactly what the next token sees"
            assert torch.equal(layer.positions[0, 0], torch.arange(L - window + 1, L))
            continue
        scores = oracle_scores(probs[i][0], kv_heads, W, K)
        kept = cache.kept_positions(i)[0]
        assert kept.shape == (kv_heads, C)
        assert torch.equal(kept[:, C - W:], torch.arange(L - W, L).expand(kv_heads, W)), "the window is kept"
        assert_same_selection(kept[:, : C - W], scores, C - W, f"{arch} layer {i}")


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_above_the_prompt_is_token_identical(arch):
    model = tiny_model(arch, layers=4)
    ids = prompt(60)
    want = greedy(model, ids)  # the model's own cache (DynamicCache for its config)
    cache = SnapKVCache(model, max_capacity_prompt=100, window_size=8, kernel_size=3)
    assert torch.equal(greedy(model, ids, cache), want)
    assert cache.stats()["compressions"] == [0] * 4


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_rows_equal_rows_alone(arch):
    model = tiny_model(arch, layers=4)
    lens = [150, 90, 30]  # the last row is shorter than the budget
    rows = [prompt(n, seed=i) for i, n in enumerate(lens)]
    ids, mask = left_pad(rows)
    kw = dict(max_capacity_prompt=40, window_size=8, kernel_size=5)
    batch = greedy(model, ids, SnapKVCache(model, **kw), attention_mask=mask)
    for i, r in enumerate(rows):
        alone = greedy(model, r, SnapKVCache(model, **kw))
        assert torch.equal(batch[i], alone[0]), f"{arch}: row {i} differs from running it alone"


@pytest.mark.parametrize("arch", MIXED)
def test_mixed_models_stay_bounded_over_turns(arch):
    """Sliding layers at their window, global layers at the budget, over a compressed prompt,
    decoding and a second turn that re-selects."""
    model = tiny_model(arch, layers=4)
    cache = SnapKVCache(model, max_capacity_prompt=C, window_size=W, kernel_size=K)
    ids = prompt(L)
    first = greedy(model, ids, cache, n=5)
    windows = [a.sliding_window for a in attention_layers(model)]
    for layer, window in zip(cache.layers, windows):
        held = layer.keys.shape[2]
        assert held <= (window - 1 if window else C + 4), f"layer {layer.layer_idx} holds {held}"
    turn = torch.cat([ids, first, prompt(30, seed=7)], dim=1)
    greedy(model, turn, cache, n=3)
    st = cache.stats()
    assert st["logical_length"] == turn.shape[1] + 2
    for held, window in zip(st["physical_length"], windows):
        assert held == (window - 1 if window else C + 2), "the turn re-selected to the budget"
    assert st["compressions"] == [0 if w else 2 for w in windows]


def test_ratio_counts_the_global_layers_prompt():
    model = tiny_model("gemma3", layers=4)
    cache = SnapKVCache(model, compression_ratio=0.25, window_size=W)
    with torch.no_grad():
        model(prompt(L), **cache_kwargs(model, cache))
    assert cache.stats()["physical_length"] == [23, L // 4, 23, L // 4]


@pytest.mark.parametrize("arch", ["gemma3", "qwen2-sliding"])
def test_document_on_mixed_models_equals_snapkv_from_scratch(arch):
    model = tiny_model(arch, layers=4)
    doc, question = prompt(150), prompt(12, seed=3)
    kw = dict(max_capacity_prompt=C, window_size=W, kernel_size=K)
    document = SnapKVDocument(model, doc, **kw)
    for i, a in enumerate(attention_layers(model)):
        if a.sliding_window:
            assert document.keys[i].shape[2] == a.sliding_window - 1, "the store keeps a sliding layer's window only"
    ids = torch.cat([doc, question], dim=1)
    want = greedy(model, ids, SnapKVCache(model, **kw), n=6)
    got = document.generate(question, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert document.generate([question, prompt(9, seed=4)], max_new_tokens=4)[0] == want[0, :4].tolist()


def test_unsupported_architectures_get_one_line():
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"does not support GPT2LMHeadModel: attention class GPT2Attention.*"
                                         r"docs/extending.md") as e:
        SnapKVCache(gpt2)
    assert "\n" not in str(e.value)
    bidirectional = tiny_model("gemma3", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="bidirectional"):
        SnapKVCache(bidirectional)


def test_every_layer_sliding_is_said_and_kept_at_the_window():
    model = tiny_model("mistral-sliding", layers=2)
    with pytest.warns(UserWarning, match="nothing is compressed"):
        cache = SnapKVCache(model, max_capacity_prompt=C, window_size=W)
    ids = prompt(100)
    assert torch.equal(greedy(model, ids, cache), greedy(model, ids))
    assert cache.stats()["physical_length"] == [23, 23]
