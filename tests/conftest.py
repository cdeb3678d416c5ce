"""Shared fixtures: every op test runs on CPU, and on CUDA when a GPU is present."""
import pytest
import torch

import snapkv_ext

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        # A GPU without the CUDA kernels built is a broken install, not a skip.
        assert snapkv_ext.has_cuda_kernels(), "a GPU is present but snapkv_ext was built without CUDA kernels"
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(1234)


def randn(shape, dtype, device, gen, scale=1.0):
    """Random normal tensor made on the CPU (same values whatever the device), then moved."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=device)
