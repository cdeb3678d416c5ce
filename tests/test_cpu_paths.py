"""CPU-specific code paths: the kernel variants a machine may or may not pick, the huge-page
outputs, and how the library is linked."""
import os
import subprocess
import sys

import pytest
import torch

from snapkv_ext import ops, reference as ref

from conftest import assert_scores_close, randn

_WIDEN_SCRIPT = """
import sys, torch
from snapkv_ext import ops
q, k, softcap = torch.load(sys.argv[1])
torch.save(ops.window_scores(q, k, softcap=softcap), sys.argv[2])
"""


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("group,head_dim", [(1, 128), (4, 64), (3, 80)])
def test_bf16_widening_kernel(tmp_path, gen, group, head_dim, softcap):
    """bfloat16 keys have two CPU kernels: the AVX512-BF16 dot product where the CPU has it, else
    widening to float32. Whichever this process uses, run the widening one in a child process
    (SNAPKV_CPU_NO_BF16_DOT=1) and hold both to the float64 reference, with and without a cap
    (the dot-product kernel scales its logits itself: the cap must come after)."""
    q = randn((2, 2 * group, 16, head_dim), torch.bfloat16, "cpu", gen, scale=1.0 if softcap is None else 4.0)
    k = randn((2, 2, 301, head_dim), torch.bfloat16, "cpu", gen, scale=2.0)
    torch.save((q, k, softcap), tmp_path / "in.pt")
    env = dict(os.environ, SNAPKV_CPU_NO_BF16_DOT="1")
    subprocess.run([sys.executable, "-c", _WIDEN_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    assert_scores_close(torch.load(tmp_path / "out.pt"), q, k, softcap=softcap)  # widening kernel
    assert_scores_close(ops.window_scores(q, k, softcap=softcap), q, k, softcap=softcap)  # this process's kernel


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
