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
