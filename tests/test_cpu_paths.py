"""CPU-specific code paths: unusual bf16 layouts, the huge-page outputs, and how the library is
linked. (Every instruction-set path, forced in turn, is in test_cpu_isa.py.)"""
import sys

import pytest
import torch

from snapkv_ext import ops, reference as ref

from conftest import assert_scores_close, randn


@pytest.mark.parametrize("head_dim", [65, 72])
def test_bf16_odd_and_unusual_head_dims(device, gen, head_dim):
    """The bf16 dot-product kernel reads keys in pairs along D: an odd D takes the widening
    kernel instead; keys at an odd storage offset must still be read right."""
    q = randn((1, 4, 8, head_dim), torch.bfloat16, device, gen)
    k_full = randn((1, 1, 301 * head_dim + 1), torch.bfloat16, device, gen, scale=2.0)
    k = k_full[:, :, 1:].view(1, 1, 301, head_dim)  # contiguous, storage offset 1: unaligned pairs
    assert k.is_contiguous() and k.storage_offset() == 1
    assert_scores_close(ops.window_scores(q, k), q, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs(device, gen, dtype):
    """Outputs of several MB take the huge-page allocation path on CPU: still an exact gather."""
    B, H, L, D, w, cap = 1, 8, 4096, 128, 32, 2080  # 8.5 MB of float32 keys out
    q = randn((B, H, w, D), dtype, device, gen)
    keys = randn((B, H, L, D), dtype, device, gen)
    values = randn((B, H, L, D), dtype, device, gen)
    ko, vo, pos = ops.snapkv_compress(q, keys, values, cap)
    idx = pos[:, :, : cap - w]
    kr, vr = ref.compact(keys, values, idx, w)
    assert torch.equal(ko, kr) and torch.equal(vo, vr)
    ko2, vo2 = ops.compact(keys, values, idx, w)
    assert torch.equal(ko2, kr) and torch.equal(vo2, vr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime():
    """The library is built with -fopenmp (else at::parallel_for runs serially) and must share
    torch's OpenMP runtime, not load a second one."""
    import snapkv_ext._C  # noqa: F401

    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line}
    assert len(gomp) <= 1, f"more than one OpenMP runtime loaded: {sorted(gomp)}"
