"""Builds the CUDA kernels of csrc/cuda/ for the CPU simulator (cuda_sim.h) with the host
compiler, under AddressSanitizer and UndefinedBehaviorSanitizer, as the Python module
`snapkv_cuda_sim` (cached in build/cuda_sim; rebuilt when a source changes).

Loading it needs the ASan runtime first in the process: tests/test_cuda_sim.py runs the
simulator tests in a child Python started with LD_PRELOAD=<libasan> (see `sanitizer_env`).
"""
from __future__ import annotations

import glob
import os
import subprocess

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

    # The compilers the build starts need no sanitizer runtime.
    os.environ.pop("LD_PRELOAD", None)
    os.makedirs(BUILD, exist_ok=True)
    # Headers are dependencies too: ninja tracks them, but torch's own staleness check looks
    # only at the listed sources, so list the kernel headers as sources' companions.
    deps = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.*h"), recursive=True) +
                  glob.glob(os.path.join(HERE, "*.h")))
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
    ) if deps is not None else None


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
