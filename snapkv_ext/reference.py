"""Plain-torch SnapKV, written for clarity, not speed: the ground truth the kernels are tested
against. Every function computes in float64 unless told otherwise and mirrors the op of the
same name in :mod:`snapkv_ext.ops` (same arguments, same shapes).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def window_attention(
    q_window: Tensor, keys: Tensor, pad_lengths: Optional[Tensor] = None, scale: Optional[float] = None,
    softcap: Optional[float] = None, dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Softmax attention of the window queries over all keys: ``[B, H_q, w, L]`` in ``dtype``.

    Key j is visible to window query i iff it is not padding and ``j <= L - w + i``. With
    ``softcap`` (Gemma 2), the scaled logits become ``softcap * tanh(logits / softcap)`` before
    the mask and the softmax, as in Transformers' eager attention.
    """
    B, H_q, w, D = q_window.shape
    _, H_kv, L, _ = keys.shape
    group = H_q // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or finite and positive, got {softcap}")
    k = keys.to(dtype).repeat_interleave(group, dim=1)  # query head h uses KV head h // group
    logits = torch.einsum("bhid,bhjd->bhij", q_window.to(dtype), k) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    j = torch.arange(L, device=keys.device)
    i = torch.arange(w, device=keys.device)
    visible = j[None, :] <= (L - w + i)[:, None]  # [w, L]
    visible = visible[None, None].expand(B, 1, w, L)
    if pad_lengths is not None:
        visible = visible & (j[None, None, None, :] >= pad_lengths.to(keys.device)[:, None, None, None])
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


def window_scores(
    q_window: Tensor, keys: Tensor, pad_lengths: Optional[Tensor] = None, group_reduce: str = "mean",
    scale: Optional[float] = None, softcap: Optional[float] = None, dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Reference of :func:`snapkv_ext.ops.window_scores`: ``[B, H_kv, L - w]`` float32,
    computed in ``dtype`` (float64 by default; float32 to measure what fp32 costs anyway)."""
    B, H_q, w, _ = q_window.shape
    H_kv, L = keys.shape[1], keys.shape[2]
    p = window_attention(q_window, keys, pad_lengths, scale, softcap, dtype=dtype)
    votes = p.mean(dim=2)[..., : L - w].reshape(B, H_kv, H_q // H_kv, L - w)
    if group_reduce == "mean":
        out = votes.mean(dim=2)
    elif group_reduce == "max":
        out = votes.amax(dim=2)
    elif group_reduce == "sum":
        out = votes.sum(dim=2)
    else:
        raise ValueError(f"group_reduce must be 'mean', 'max' or 'sum', got {group_reduce!r}")
    return out.float()


def pool_scores(scores: Tensor, kernel_size: int, pooling: str = "max", pad_lengths: Optional[Tensor] = None) -> Tensor:
    """Reference of :func:`snapkv_ext.ops.pool_scores` (F.max_pool1d / F.avg_pool1d)."""
    x = scores.double()
    if pooling == "max":
        y = F.max_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2)
    elif pooling == "avg":
        y = F.avg_pool1d(x, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    if pad_lengths is not None:
        j = torch.arange(x.shape[2], device=x.device)
        y = y.masked_fill(j[None, None, :] < pad_lengths.to(x.device)[:, None, None], float("-inf"))
    return y.to(scores.dtype)


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Reference of :func:`snapkv_ext.ops.select_topk`: best k by score, returned in position
    order. The ranking rule of every implementation: by value (+0 and -0 equal, -inf below every
    finite score), NaN below everything, ties to the lower position."""
    x = scores.double()
    # Stable sorts keep equal scores in position order: by value (NaN set aside as -inf), then
    # NaN after everything else.
    order = torch.sort(x.nan_to_num(nan=float("-inf")), dim=-1, descending=True, stable=True).indices
    nan_last = torch.sort(x.gather(-1, order).isnan().to(torch.uint8), dim=-1, stable=True).indices
    order = order.gather(-1, nan_last)
    return order[..., :k].sort(dim=-1).values


def compact(keys: Tensor, values: Tensor, indices: Tensor, window_size: int) -> Tuple[Tensor, Tensor]:
    """Reference of :func:`snapkv_ext.ops.compact`: ``[rows at indices, last w rows]``."""
    L = keys.shape[2]
    idx = indices[..., None].expand(-1, -1, -1, keys.shape[3])
    out = []
    for t in (keys, values):
        out.append(torch.cat([t.gather(2, idx), t[:, :, L - window_size :]], dim=2))
    return out[0], out[1]


def snapkv_compress(
    q_window: Tensor, keys: Tensor, values: Tensor, max_capacity_prompt: int, kernel_size: int = 7,
    pooling: str = "max", group_reduce: str = "mean", pad_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None, softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`snapkv_ext.ops.snapkv_compress`."""
    B, H_kv, L, _ = keys.shape
    w = q_window.shape[2]
    if L <= max_capacity_prompt:
        pos = torch.arange(L, device=keys.device).expand(B, H_kv, L)
        return keys.clone(), values.clone(), pos.clone()
    s = window_scores(q_window, keys, pad_lengths, group_reduce, scale, softcap)
    s = pool_scores(s, kernel_size, pooling, pad_lengths)
    idx = select_topk(s, max_capacity_prompt - w)
    k_out, v_out = compact(keys, values, idx, w)
    win = torch.arange(L - w, L, device=keys.device).expand(B, H_kv, w)
    return k_out, v_out, torch.cat([idx, win], dim=2)


def snapkv_compress_into(
    q_window: Tensor, keys: Tensor, values: Tensor, max_capacity_prompt: int, keys_out: Tensor,
    values_out: Tensor, kernel_size: int = 7, pooling: str = "max", group_reduce: str = "mean",
    pad_lengths: Optional[Tensor] = None, scale: Optional[float] = None, softcap: Optional[float] = None,
) -> Tensor:
    """Reference of :func:`snapkv_ext.ops.snapkv_compress_into`."""
    k_out, v_out, pos = snapkv_compress(q_window, keys, values, max_capacity_prompt, kernel_size, pooling,
                                        group_reduce, pad_lengths, scale, softcap)
    keys_out.copy_(k_out)
    values_out.copy_(v_out)
    return pos
