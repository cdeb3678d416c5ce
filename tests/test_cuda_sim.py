"""The CUDA kernels, executed on the CPU: runs tests/cuda_sim (every kernel of csrc/cuda/ through
the simulator, against the float64 reference, under AddressSanitizer and UBSan) in a child
process that has the ASan runtime preloaded, as an instrumented library needs."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_sim"))

import simbuild  # noqa: E402


def test_cuda_kernels_on_cpu_under_sanitizers():
    env = simbuild.sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", os.path.join(HERE, "cuda_sim")],
        env=env, capture_output=True, text=True, timeout=1800, cwd=os.path.dirname(HERE),
    )
    report = (r.stdout + r.stderr)[-6000:]
    print(report)
    assert r.returncode == 0, report
    assert " passed" in r.stdout and "skipped" not in r.stdout, report
