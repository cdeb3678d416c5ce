"""The snapkv-ext command line end to end on small settings: outputs parse and make sense,
pictures open with the expected size, bad arguments exit non-zero with one clear line."""
import json
import os
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
    assert "x smaller" in out


def test_generate_file(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse on Gull Island was painted green in 1931. " * 30 + "The keeper was named Ada Pike.")
    code, out, err = run_cli(["generate", "--file", str(doc), "--question", "Who was the keeper?",
                              "--max-capacity-prompt", "96", "--window-size", "16", "--max-new-tokens", "12",
                              "--compare", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "[snapkv-96]" in out and "[full]" in out


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


def test_bench(tmp_path, capsys):
    code, out, err = run_cli(["bench", "--lengths", "128", "256", "--max-capacity-prompts", "64", "--window-size", "16",
                              "--steps", "4", "--reps", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["methods"] == ["full", "snapkv-64"]
    rows = {(r["method"], r["prompt_tokens"]): r for r in res["rows"]}
    assert set(rows) == {("full", 128), ("full", 256), ("snapkv-64", 128), ("snapkv-64", 256)}
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    # The full cache grows with the prompt; SnapKV holds the budget.
    assert rows[("full", 256)]["kv_mb"] == pytest.approx(2 * rows[("full", 128)]["kv_mb"])
    assert rows[("snapkv-64", 256)]["kv_mb"] == rows[("snapkv-64", 128)]["kv_mb"] < rows[("full", 128)]["kv_mb"]
    from PIL import Image

    with Image.open(tmp_path / "bench.png") as im:
        assert im.size == (1000, 400)


def test_eval_needle(tmp_path, capsys):
    code, out, err = run_cli(["eval", "needle", "--lengths", "300", "600", "--depths", "0.2", "0.8",
                              "--compression-ratios", "0.5", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "needle.json").read_text())
    assert res["cases"] == 4 and set(res["retrieved"]) == {"full", "snapkv-50%"}
    assert all(isinstance(x, bool) for grid in res["retrieved"].values() for row in grid for x in row)
    assert res["summary"]["full"] >= 3, "the real model finds the pass key in short prompts"
    from PIL import Image

    for name in ("full", "snapkv-50pct"):
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
])
def test_user_errors(tmp_path, capsys, argv, message):
    code, out, err = run_cli(argv + ["--out", str(tmp_path)], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


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
