"""The GPU first-contact command (benchmarks/gpu_check/first_contact.sh) in its dry run: every step
on the CPU with tiny shapes and no GPU tool, so the command a lent GPU's session runs cannot rot;
and its time budget: a step stopped part way keeps its results, later ones are skipped, said so."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

from conftest import Background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check", "first_contact.sh")
STEPS = ["build", "tests", "ops", "e2e", "ncu", "memcheck", "racecheck"]


def _env(out, budget=None):
    env = dict(os.environ, OUT=str(out), PY=sys.executable, GPU_CHECK_DRY_RUN="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    if budget is not None:
        env["FIRST_CONTACT_BUDGET"] = str(budget)
    return env


def _steps(out):
    lines = (out / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line for line in lines[1:] if line.split()[0] in STEPS}


def first_contact(out, budget=None):
    r = subprocess.run(["bash", SCRIPT], env=_env(out, budget), capture_output=True, text=True, timeout=900)
    return r, _steps(out)


# The whole dry run is single-threaded work in child processes: conftest.py starts it as soon as
# the tests are collected (start) and runs the test that waits for it last, beside the suite.
_child = Background()
_out = []  # its output folder, made when it starts


def start() -> Background:
    if not _out:
        _out.append(pathlib.Path(tempfile.mkdtemp(prefix="first_contact_dry.")))
    return _child.start(["bash", SCRIPT], env=_env(_out[0]))


def stop():
    _child.stop()


def test_every_step_runs_and_returns_few_files():
    text = start().wait(timeout=900)
    out = _out[0]
    assert _child.proc.returncode == 0, text[-6000:]
    _check_full_run(out, _steps(out))
    shutil.rmtree(out, ignore_errors=True)


def _check_full_run(tmp_path, steps):
    assert list(steps) == STEPS and all(" ok " in line for line in steps.values()), steps
    # the device tool brings back at most 8 files: three
    assert sorted(os.listdir(tmp_path)) == ["build.tar.gz", "results.tar.gz", "summary.txt"]
    with tarfile.open(tmp_path / "build.tar.gz") as t:
        assert any(n.startswith("snapkv_ext/_C") and n.endswith(".so") for n in t.getnames())
    with tarfile.open(tmp_path / "results.tar.gz") as t:
        names = {os.path.basename(n) for n in t.getnames()}
        for step in STEPS:
            assert f"{step}.txt" in names
        # one pytest process (and JUnit file) per op test file; the benchmarks' JSON
        assert {"pytest-test_window_scores.xml", "pytest-test_ragged_attention.xml", "bench_ops.json",
                "bench_ops_resident.json", "bench_ops_shared.json", "bench_decode.json", "bench_generate.json"} <= names
        rows = json.load(t.extractfile(next(m for m in t.getmembers() if m.name.endswith("/bench_ops.json"))))["rows"]
        assert {row["op"] for row in rows} == {"window_scores", "fused", "fused_into"}
        tests = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("/tests.txt"))).read().decode()
        assert tests.count("---- tests/") == 7 and "deselected" in tests


def test_budget_stops_and_skips_keeping_what_was_done(tmp_path):
    # The whole dry run takes over a minute; 45 s stops or skips some of it (a step starts only
    # with 20 s left, and the build leaves at least that).
    r, steps = first_contact(tmp_path, budget=45)
    assert list(steps) == STEPS, steps
    assert " ok " in steps["build"]
    assert all(("ok" in line or "stopped" in line or "skipped" in line) for line in steps.values()), steps
    assert any("stopped" in line or "skipped" in line for line in steps.values()), steps
    with tarfile.open(tmp_path / "results.tar.gz") as t:  # what the steps that ran wrote
        assert any(n.endswith("/tests.txt") for n in t.getnames())


def test_bad_mode_is_refused(tmp_path):
    r = subprocess.run(["bash", SCRIPT, "everything"], capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)))
    assert r.returncode == 2 and "usage" in r.stderr
