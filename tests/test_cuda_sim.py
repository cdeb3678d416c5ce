"""The CUDA kernels, executed on the CPU: runs tests/cuda_sim (every kernel of csrc/cuda/ through
the simulator, against the float64 reference, under AddressSanitizer and UBSan) in a child
process that has the ASan runtime preloaded, as an instrumented library needs.

The child is single-threaded (its build, one large translation unit, and the simulated kernels):
conftest.py starts it as soon as the session's tests are collected (:func:`start`) and runs this
test last, so that it runs beside the rest of the suite on the other core."""
import os
import sys

from conftest import Background

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_sim"))

import simbuild  # noqa: E402


_child = Background()


def start() -> Background:
    """Start the simulator suite in its child process, once."""
    env = simbuild.sanitizer_env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    return _child.start([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                         os.path.join(HERE, "cuda_sim")], env=env, cwd=os.path.dirname(HERE))


def stop():
    """End the child if it is still running (the session ended before this test, e.g. with -x)."""
    _child.stop()


def test_cuda_kernels_on_cpu_under_sanitizers():
    text = start().wait(timeout=1800)
    report = text[-6000:]
    print(report)
    assert _child.proc.returncode == 0, report
    assert " passed" in text and "skipped" not in text, report
