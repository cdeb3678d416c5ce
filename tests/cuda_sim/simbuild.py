"""Builds the CUDA kernels of csrc/cuda/ for the CPU simulator (cuda_sim.h) with the host
compiler, under AddressSanitizer and UndefinedBehaviorSanitizer, as the Python module
`snapkv_cuda_sim` (cached in build/cuda_sim; rebuilt when a source changes).

Loading it needs the ASan runtime first in the process: tests/test_cuda_sim.py runs the
simulator tests in a child Python started with LD_PRELOAD=<libasan> (see `sanitizer_env`).
"""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(ROOT, "build", "cuda_sim")

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def sources():
    return [os.path.join(HERE, "cuda_sim.cpp"), os.path.join(HERE, "sim_ops.cpp"),
            os.path.join(ROOT, "csrc", "checks.cpp")]


def load(verbose: bool = False):
    """Builds (if needed) and imports the simulator module. Call with the ASan runtime preloaded."""
    from torch.utils.cpp_extension import load as load_ext

    # The compilers the build starts need no sanitizer runtime; ninja comes from this Python's
    # environment when it is not on PATH.
    os.environ.pop("LD_PRELOAD", None)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    os.makedirs(BUILD, exist_ok=True)
    # ninja tracks the kernel headers through the compiler's dependency files.
    return load_ext(
        name="snapkv_cuda_sim",
        sources=sources(),
        extra_include_paths=[os.path.join(ROOT, "csrc"), HERE],
        extra_cflags=["-O2", "-g", "-DSNAPKV_CUDA_SIM", "-Wall", "-Wno-unknown-pragmas"] + SANITIZE,
        extra_ldflags=SANITIZE,
        build_directory=BUILD,
        verbose=verbose,
        keep_intermediates=True,
        with_cuda=False,
    )


def asan_runtime() -> str:
    """Path of the host compiler's libasan (what LD_PRELOAD must name)."""
    cxx = os.environ.get("CXX", "c++")
    return subprocess.check_output([cxx, "-print-file-name=libasan.so"], text=True).strip()


def sanitizer_env(base=None) -> dict:
    env = dict(os.environ if base is None else base)
    # libstdc++ too: Python does not link it, and ASan's interceptor of __cxa_throw (every C++
    # exception, e.g. a TORCH_CHECK) must find the real one when ASan starts.
    env["LD_PRELOAD"] = asan_runtime() + " libstdc++.so.6"
    # Python and torch are not instrumented: their allocations outlive the process, and torch
    # frees some objects with another allocator's delete than ASan expects.
    env["ASAN_OPTIONS"] = ("detect_leaks=0:alloc_dealloc_mismatch=0:detect_stack_use_after_return=0:"
                           "abort_on_error=0:halt_on_error=1")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env
