"""The README's Python example, run as written (only max_new_tokens cut, and the model name pointed
at a local folder): both ways of getting a model, then generation with a SnapKV cache. The
project's pytest settings turn Transformers' `past_key_values` deprecation into an error, so this
also checks that the example passes the cache the way the installed Transformers wants."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(section: str):
    """The ```python blocks of one README section (from its '## ' heading to the next)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], re.S)


@pytest.fixture(scope="module")
def example():
    blocks = python_blocks("Use it from Python")
    assert len(blocks) >= 3, "the section shows the embedded model, a model of yours, then generation"
    embedded, yours, generate = blocks[:3]
    assert "load_model()" in embedded and "from_pretrained(name" in yours and "SnapKVCache(" in generate
    assert "max_new_tokens=256" in generate
    return embedded, yours, generate.replace("max_new_tokens=256", "max_new_tokens=8")


def run(code: str, tmp_path, monkeypatch, words: int):
    """Runs the example in tmp_path with a report.txt of about `words` words; returns its namespace."""
    from snapkv_ext.tools.haystack import haystack

    (tmp_path / "report.txt").write_text(" ".join(haystack(words // 17)))
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns


def test_readme_example_embedded_model(example, tmp_path, monkeypatch, capsys):
    embedded, _, generate = example
    ns = run(embedded + generate, tmp_path, monkeypatch, words=950)
    s = ns["cache"].stats()
    assert ns["inputs"]["input_ids"].shape[1] > 1024  # a prompt longer than the budget ...
    assert max(s["physical_length"]) < ns["inputs"]["input_ids"].shape[1] and s["kv_reduction"] > 1.05  # compressed
    printed = capsys.readouterr().out
    assert "kv_reduction" in printed and printed.split("{")[0].strip(), "an answer, then the stats"


def test_readme_example_your_model(example, tmp_path, monkeypatch):
    """The from_pretrained way, on a folder holding a small random Llama and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from snapkv_ext.tools.models import GGUF_FILE, smollm2_dir, tiny_model

    _, yours, generate = example
    folder = tmp_path / "my-model"
    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE)
    tok.save_pretrained(folder)
    model = tiny_model("llama", vocab=len(tok))
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.save_pretrained(folder)
    code = re.sub(r'name = "[^"]*"', f"name = {str(folder)!r}", yours)
    assert code != yours
    ns = run(code + generate, tmp_path, monkeypatch, words=950)
    assert ns["inputs"]["input_ids"].shape[1] > 1024
    held = set(ns["cache"].stats()["physical_length"])  # per layer: the budget, then the decoded tokens
    assert len(held) == 1 and 1024 < held.pop() <= 1024 + 7



def test_readme_policies_section(capsys):
    """The budget-policies section as written, on a small random Llama: a per-head policy by name,
    then the custom policy, each decoding with heads that keep different numbers of entries."""
    import torch

    from snapkv_ext.cache import cache_kwargs
    from snapkv_ext.tools.models import tiny_model

    blocks = python_blocks("Per-head and per-layer budgets (AdaKV, PyramidKV)")
    assert len(blocks) == 2 and 'policy="adakv"' in blocks[0] and "class VoteShare(SelectionPolicy)" in blocks[1]
    ids = torch.randint(3, 128, (2, 400), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", layers=2)
    ns = {"model": model, "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    exec(compile(blocks[0].replace("max_new_tokens=64", "max_new_tokens=4"), "README.md", "exec"), ns)
    assert ns["out"].shape == (2, 404)
    budget = 2 * 2 * 40  # 10% of 400 per KV head (2 heads, 2 rows)
    assert capsys.readouterr().out.strip() == str([budget + 2 * 2 * 3] * 2), "kept entries per layer: 3 decoded"
    lengths = ns["cache"].layers[0].kept_lengths()
    assert len(set(lengths.flatten().tolist())) > 1, "the heads keep different counts"
    exec(compile(blocks[1], "README.md", "exec"), ns)
    vote = ns["cache"]
    assert type(vote.config.policy).__name__ == "VoteShare"
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       **cache_kwargs(model, vote))
    lengths = vote.layers[0].kept_lengths()
    assert len(set(lengths.flatten().tolist())) > 1, "the heads keep different counts"
    assert int(lengths.sum()) <= budget + 2 * 2 * 1, "within the layer's budget, plus the decoded token"
