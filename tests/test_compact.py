"""compact / compact_into: exact gather of the selected rows then the window."""
import pytest
import torch

from snapkv_ext import ops, reference as ref

from conftest import randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_indices(B, H, L, w, k, gen, device):
    idx = torch.stack([torch.randperm(L - w, generator=gen)[:k].sort().values for _ in range(B * H)])
    return idx.view(B, H, k).to(device)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_matches_reference(device, gen, dtype, head_dim):
    B, H, L, w, k = 2, 3, 97, 16, 40
    keys = randn((B, H, L, head_dim), dtype, device, gen)
    values = randn((B, H, L, head_dim), dtype, device, gen)
    idx = random_indices(B, H, L, w, k, gen, device)
    ko, vo = ops.compact(keys, values, idx, w)
    kr, vr = ref.compact(keys, values, idx, w)
    assert ko.shape == (B, H, k + w, head_dim) and ko.dtype == dtype
    assert torch.equal(ko, kr) and torch.equal(vo, vr)


def test_compact_into_strided_buffers(device, gen):
    """Outputs may be the front of a larger preallocated cache; inputs may be strided views."""
    B, H, L, D, w, k = 2, 2, 60, 64, 8, 20
    keys = randn((B, L, H, D), torch.float32, device, gen).transpose(1, 2)  # strided
    values = randn((B, H, L, D), torch.float32, device, gen)
    idx = random_indices(B, H, L, w, k, gen, device)
    big_k = torch.full((B, H, 100, D), 7.0, device=device)
    big_v = torch.full((B, H, 100, D), 7.0, device=device)
    ops.compact_into(keys, values, idx, w, big_k[:, :, : k + w], big_v[:, :, : k + w])
    kr, vr = ref.compact(keys, values, idx, w)
    assert torch.equal(big_k[:, :, : k + w], kr) and torch.equal(big_v[:, :, : k + w], vr)
    assert (big_k[:, :, k + w :] == 7.0).all() and (big_v[:, :, k + w :] == 7.0).all()


def test_compact_empty_selection(device, gen):
    keys = randn((1, 2, 10, 64), torch.float32, device, gen)
    idx = torch.empty(1, 2, 0, dtype=torch.int64, device=device)
    ko, vo = ops.compact(keys, keys.clone(), idx, 4)
    assert torch.equal(ko, keys[:, :, -4:])
