"""The CPU code path the native kernels run, and the machine they run on.

The CPU kernels are compiled once per instruction set, each with register tiles sized to its
register file: ``avx512bf16`` (AVX-512 with the bfloat16 dot product), ``avx512`` (x86-64-v4),
``avx2`` (x86-64-v3: AVX2 + FMA) and ``baseline`` (SSE2 on x86-64, NEON on aarch64). The best one
the CPU has runs, unless forced:

    SNAPKV_CPU_ISA=avx2 python ...          # read when snapkv_ext is imported
    snapkv_ext.set_cpu_isa("baseline")      # or in the process
    with snapkv_ext.forced_cpu_isa("avx2"): ...

A path the CPU lacks is refused with the list of those it has.
"""
from __future__ import annotations

import contextlib
import os
import platform
import warnings

from . import _C

ISAS = ("avx512bf16", "avx512", "avx2", "baseline")
ENV = "SNAPKV_CPU_ISA"


def cpu_isa() -> str:
    """The CPU path the kernels use now."""
    return _C.cpu_isa()


def cpu_isas() -> list[str]:
    """The CPU paths this machine can run, best first (``baseline`` always)."""
    return list(_C.cpu_isas())


def set_cpu_isa(name: str) -> None:
    """Force a CPU path for this process (``"auto"``: the best the CPU has).

    Raises ValueError for an unknown name and RuntimeError for a path this CPU lacks."""
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_isa: name must be a str (one of auto, {', '.join(ISAS)}), got {type(name).__name__}")
    _C.set_cpu_isa(name)


@contextlib.contextmanager
def forced_cpu_isa(name: str):
    """Run the block with a CPU path forced, then restore the one before."""
    before = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(before)


def cpu_info() -> dict:
    """The CPU model, the vector flags that decide the path, and the path in use (for benchmark
    records and ``snapkv-ext info``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "asimd", "sve")
    return {
        "model": model,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
        "isa": cpu_isa(),
        "isas": cpu_isas(),
    }


def _apply_env() -> None:
    """SNAPKV_CPU_ISA at import; SNAPKV_CPU_NO_BF16_DOT=1, its former spelling for 'not the
    bf16 dot product', still works with a deprecation warning."""
    name = os.environ.get(ENV, "").strip()
    legacy = os.environ.get("SNAPKV_CPU_NO_BF16_DOT", "0") not in ("", "0")
    if legacy:
        warnings.warn(
            "SNAPKV_CPU_NO_BF16_DOT is deprecated: use SNAPKV_CPU_ISA=avx512 (the AVX-512 path without the "
            "bfloat16 dot product)",
            DeprecationWarning,
            stacklevel=3,
        )
        if not name and cpu_isa() == "avx512bf16":
            name = "avx512"
    if not name:
        return
    try:
        _C.set_cpu_isa(name)
    except (ValueError, RuntimeError) as e:
        raise type(e)(f"{ENV}={name}: {e}") from None
