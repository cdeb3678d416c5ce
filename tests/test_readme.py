"""The documentation's code, run as written: README.md's Python example (only max_new_tokens cut,
and the model name pointed at a local folder): both ways of getting a model, then generation with a
SnapKV cache; and docs/policies.md's two blocks. The project's pytest settings turn Transformers'
`past_key_values` deprecation into an error, so this also checks that the examples pass the cache
the way the installed Transformers wants. Every ```python block of README.md and docs/*.md at
least compiles, every relative link points to a file that exists, and README.md stays a landing
page (at most 200 lines, its install block ending with `snapkv-ext demo`, as
tools/check_fresh_install.sh needs)."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^(```+|~~~+)")


def read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def fences(text: str):
    """(info string, code) of each fenced block of a markdown text, and the text outside them."""
    found, outside, fence, info, code = [], [], None, "", []
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence, info, code = m.group(1), line[len(m.group(1)):].strip(), []
        elif fence is not None and line.strip() == fence:
            found.append((info, "\n".join(code) + "\n"))
            fence = None
        elif fence is not None:
            code.append(line)
        else:
            outside.append(line)
    assert fence is None, "an unclosed code fence"
    return found, "\n".join(outside)


def section(text: str, heading: str) -> str:
    """One section of a markdown text: from the heading line (any level) to the next heading of the
    same or a higher level outside code blocks, so a '# ' page title takes in its '## ' parts."""
    lines, start, level, in_fence = text.split("\n"), None, 0, None
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if in_fence is None and m:
            in_fence = m.group(1)
            continue
        if in_fence is not None:
            in_fence = None if line.strip() == in_fence else in_fence
            continue
        h = re.match(r"^(#{1,6}) (.*?)\s*$", line)
        if h and start is None and h.group(2) == heading:
            start, level = i, len(h.group(1))
        elif h and start is not None and len(h.group(1)) <= level:
            return "\n".join(lines[start:i])
    if start is None:
        raise ValueError(f"no heading {heading!r}")
    return "\n".join(lines[start:])


def python_blocks(page: str, heading: str = None):
    """The ```python blocks of one page (README.md or docs/<page>.md), or of one of its sections."""
    text = read(page)
    if heading is not None:
        text = section(text, heading)
    return [code for info, code in fences(text)[0] if info == "python"]


@pytest.fixture(scope="module")
def example():
    blocks = python_blocks("README.md", "Use it from Python")
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


def test_docs_policies_page(capsys):
    """docs/policies.md as written, on a small random Llama: a per-head policy by name, then the
    custom policy, each decoding with heads that keep different numbers of entries."""
    import torch

    from snapkv_ext.cache import cache_kwargs
    from snapkv_ext.tools.models import tiny_model

    blocks = python_blocks("docs/policies.md", "Per-head and per-layer budgets (AdaKV, PyramidKV)")
    assert len(blocks) == 2 and 'policy="adakv"' in blocks[0] and "class VoteShare(SelectionPolicy)" in blocks[1]
    ids = torch.randint(3, 128, (2, 400), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", layers=2)
    ns = {"model": model, "inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    exec(compile(blocks[0].replace("max_new_tokens=64", "max_new_tokens=4"), "docs/policies.md", "exec"), ns)
    assert ns["out"].shape == (2, 404)
    budget = 2 * 2 * 40  # 10% of 400 per KV head (2 heads, 2 rows)
    assert capsys.readouterr().out.strip() == str([budget + 2 * 2 * 3] * 2), "kept entries per layer: 3 decoded"
    lengths = ns["cache"].layers[0].kept_lengths()
    assert len(set(lengths.flatten().tolist())) > 1, "the heads keep different counts"
    exec(compile(blocks[1], "docs/policies.md", "exec"), ns)
    vote = ns["cache"]
    assert type(vote.config.policy).__name__ == "VoteShare"
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0,
                       **cache_kwargs(model, vote))
    lengths = vote.layers[0].kept_lengths()
    assert len(set(lengths.flatten().tolist())) > 1, "the heads keep different counts"
    assert int(lengths.sum()) <= budget + 2 * 2 * 1, "within the layer's budget, plus the decoded token"


def test_docs_scorers_page():
    """docs/scorers.md as written, on a small random Llama: the built-in scorers by name and object,
    then the scorer of one's own, each keeping what its definition says."""
    import torch

    from snapkv_ext.cache import cache_kwargs
    from snapkv_ext.tools.models import tiny_model

    blocks = python_blocks("docs/scorers.md")
    assert len(blocks) == 2 and 'scorer="keynorm"' in blocks[0] and "class ValueNorm(Scorer)" in blocks[1]
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    for i, code in enumerate(blocks):
        ns = {"model": model}
        exec(compile(code, "docs/scorers.md", "exec"), ns)
        for cache in [ns[k] for k in ("cache", "cache2") if k in ns]:
            with torch.no_grad():
                model(ids, **cache_kwargs(model, cache))
            assert cache.layers[0].kept_entries() <= 64 * 2 and cache.stats()["compressions"] == [1, 1]
    dc = ns["cache"]  # ValueNorm: the 32 largest value norms of each head, and the window
    from transformers import DynamicCache

    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    norms = full.layers[0].values[0, 0, :168].norm(dim=-1)
    want = sorted(norms.topk(32).indices.tolist()) + list(range(168, 200))
    assert dc.kept_positions(0)[0, 0].tolist() == want


def test_docs_pages_found():
    assert "docs/README.md" in PAGES and "docs/policies.md" in PAGES
    index = read("docs/README.md")
    for page in PAGES:
        if page.startswith("docs/") and page != "docs/README.md":
            assert f"]({os.path.basename(page)})" in index, f"docs/README.md does not list {page}"


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_compile(page):
    """Every ```python block of README.md and docs/*.md is valid Python (the ones the tests above do
    not run use names the page has defined in prose, so they are compiled, not run)."""
    for i, code in enumerate(python_blocks(page)):
        compile(code, f"{page}, python block {i + 1}", "exec")


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_exist(page):
    """Every relative link of README.md and docs/*.md (outside code blocks) points to a file that
    exists, and a #fragment into a markdown page to one of its headings."""
    text = fences(read(page))[1]
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page != "README.md", "README.md links into docs/"
    for link in links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:
            continue
        path, _, fragment = link.partition("#")
        target = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        assert os.path.exists(target), f"{page}: link {link!r} points to a missing file"
        assert os.path.commonpath([target, ROOT]) == ROOT, f"{page}: link {link!r} leaves the repository"
        if fragment and target.endswith(".md"):
            headings = re.findall(r"^#{1,6} (.*?)\s*$", fences(read(os.path.relpath(target, ROOT)))[1], re.M)
            assert fragment in {anchor(h) for h in headings}, f"{page}: link {link!r}: no such heading"


def test_readme_is_a_landing_page():
    """README.md stays short (the rest is in docs/), and keeps the install block that
    tools/check_fresh_install.sh runs: the first ```bash block under its heading, ending with
    `snapkv-ext demo`."""
    text = read("README.md")
    assert len(text.splitlines()) <= 200, "README.md is a landing page: move details to docs/"
    install = [code for info, code in fences(section(text, "Install into your own environment"))[0] if info == "bash"]
    assert install, "README.md has no bash block under '## Install into your own environment'"
    last = [line for line in install[0].splitlines() if line.strip()][-1]
    assert re.sub(r"\s*#.*", "", last) == "snapkv-ext demo"
