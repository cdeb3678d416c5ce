"""Builds snapkv_ext._C: CPU kernels always, CUDA kernels (sm_80, sm_90) when a CUDA toolkit
and a CUDA build of torch are present.

    pip install --no-build-isolation .        # or -e . for development

Environment: SNAPKV_FORCE_CPU=1 skips the CUDA kernels; SNAPKV_REQUIRE_CUDA=1 fails without them; DEBUG=1 builds with -O0 -g;
TORCH_CUDA_ARCH_LIST overrides the default "8.0;9.0"; MAX_JOBS bounds parallel compiles.
"""
import glob
import os
import shutil

# torch guesses CUDA_HOME from the nvcc on PATH; where that is a wrapper script outside the
# toolkit (as on the project's machines) the guess is wrong, so prefer the standard location.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
# Without a GPU torch cannot guess the architectures: build for A100 and H100.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("SNAPKV_FORCE_CPU") == "1":
        return False
    has_toolkit = CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
    )
    return torch.version.cuda is not None and bool(has_toolkit)


def extensions():
    if os.environ.get("SNAPKV_REQUIRE_CUDA") == "1" and not want_cuda():
        raise RuntimeError(
            "SNAPKV_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: need a CUDA build of torch "
            f"(torch.version.cuda = {torch.version.cuda}) and a CUDA toolkit (CUDA_HOME = {CUDA_HOME})"
        )
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # With torch's OpenMP backend, at::parallel_for is a header template that runs serially in
    # files built without -fopenmp (csrc/cpu_parallel.h refuses that); the library then links the
    # libgomp torch has already loaded (same soname), so there is one OpenMP runtime.
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    # -fno-trapping-math: without it GCC will not if-convert the clamps of the vectorised exp
    # (csrc/cpu_math.h), and the softmax loops stay scalar. Results are unchanged (no FP traps are used).
    cxx = opt + (["-fopenmp"] if openmp else ["-fopenmp-simd"]) + ["-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    link = ["-fopenmp"] if openmp else []
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
        if debug:
            nvcc += ["-G"]
        return [
            CUDAExtension(
                "snapkv_ext._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=[("SNAPKV_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "snapkv_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


setup(
    packages=find_packages(include=["snapkv_ext", "snapkv_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
