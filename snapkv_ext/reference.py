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


def policy_capacities(policy: str, max_capacity_prompt: int, window_size: int, num_layers: int,
                      beta: float = 20.0) -> list:
    """Reference of :meth:`snapkv_ext.policies.SelectionPolicy.layer_capacities` for the built-in
    policies by name: uniform, or (``pyramidkv``, ``ada-pyramidkv``) prefix budgets on the line from
    ``2k - k/beta`` down to ``k/beta``, rounded down, the remainder to the lowest layers."""
    if policy in ("snapkv", "adakv") or num_layers <= 1:
        return [max_capacity_prompt] * num_layers
    k = max_capacity_prompt - window_size
    top, bottom = 2 * k - k / beta, k / beta
    out = [math.floor(top - (top - bottom) * i / (num_layers - 1)) for i in range(num_layers)]
    short = num_layers * k - sum(out)
    out = [b + (1 if i < short % num_layers else 0) + short // num_layers for i, b in enumerate(out)]
    return [b + window_size for b in out]


def _rank_key(s: float, j):
    # best first: by score, NaN below everything, then the lower index
    return (1, 0.0, j) if math.isnan(s) else (0, -s, j)


def policy_keep(
    q_window: Tensor, keys: Tensor, max_capacity_prompt: int, policy: str = "snapkv", floor: float = 0.2,
    kernel_size: int = 7, pooling: str = "max", group_reduce: str = "mean", pad_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None, softcap: Optional[float] = None,
) -> Tensor:
    """Reference of a layer's selection under a built-in policy, written as loops: ``[B, H_kv, L]``
    bool, True where a head keeps the entry. ``snapkv``/``pyramidkv``: each head its best
    ``max_capacity_prompt - w`` prefix positions; ``adakv``/``ada-pyramidkv``: each head first its
    best ``floor(floor * k)``, then the best ``H_kv * (k - floor)`` left over all heads together
    (ties: lower head, then lower position). Left padding is never kept; the window always is."""
    B, H, L, _ = keys.shape
    w = q_window.shape[2]
    scored_pad = None if pad_lengths is None else pad_lengths.clamp(max=L - w)  # the ops take padding up to P
    s = pool_scores(window_scores(q_window, keys, scored_pad, group_reduce, scale, softcap), kernel_size, pooling,
                    scored_pad)
    return policy_keep_scored(s, w, max_capacity_prompt, policy, floor, pad_lengths)


def policy_keep_scored(scores: Tensor, window_size: int, max_capacity_prompt: int, policy: str = "snapkv",
                       floor: float = 0.2, pad_lengths: Optional[Tensor] = None) -> Tensor:
    """:func:`policy_keep` from pooled scores ``[B, H_kv, P]`` (however they were computed, e.g.
    from a model's own attention probabilities): ``[B, H_kv, P + window_size]`` bool."""
    B, H, P = scores.shape
    w = window_size
    L = P + w
    pad = [0] * B if pad_lengths is None else [int(x) for x in pad_lengths]
    keep = torch.zeros(B, H, L, dtype=torch.bool)
    for b in range(B):
        first = min(pad[b], P)
        k = min(max_capacity_prompt - w, P - first)
        row = scores[b].tolist()
        ranked = [sorted(range(first, P), key=lambda j, h=h: _rank_key(row[h][j], j)) for h in range(H)]
        if policy in ("adakv", "ada-pyramidkv"):
            base = math.floor(floor * k)
            rest = sorted(((h, r) for h in range(H) for r in range(base, P - first)),
                          key=lambda hr: _rank_key(row[hr[0]][ranked[hr[0]][hr[1]]], hr))
            counts = [base] * H
            for h, _ in rest[: H * (k - base)]:
                counts[h] += 1
        else:
            counts = [k] * H
        for h in range(H):
            for j in ranked[h][: counts[h]]:
                keep[b, h, j] = True
            for j in range(max(P, pad[b]), L):
                keep[b, h, j] = True
    return keep


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


def ragged_attention(
    q: Tensor, keys: Tensor, values: Tensor, starts: Tensor, lengths: Tensor, scale: float,
    softcap: Optional[float] = None, dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Reference of :func:`snapkv_ext.ops.ragged_attention`: ``[B, H_q, n, D]`` in q's dtype,
    computed in ``dtype`` (float64 by default; float32 to measure what fp32 costs anyway).

    Segment (b, h) is ``keys[starts[b, h] : starts[b, h] + lengths[b, h]]``; new token i of query
    head hq (KV head ``hq // G``) attends to its entries ``0 .. lengths[b, h] - n + i``.
    """
    B, H_q, n, D = q.shape
    H_kv = starts.shape[1]
    group = H_q // H_kv
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or finite and positive, got {softcap}")
    out = torch.empty(B, H_q, n, D, dtype=dtype, device=q.device)
    st, ln = starts.cpu().tolist(), lengths.cpu().tolist()
    i = torch.arange(n, device=q.device)
    for b in range(B):
        for h in range(H_kv):
            s0, L = st[b][h], ln[b][h]
            k = keys[s0 : s0 + L].to(dtype)  # [L, D]
            v = values[s0 : s0 + L].to(dtype)
            qh = q[b, h * group : (h + 1) * group].to(dtype)  # [G, n, D]
            logits = torch.einsum("gid,jd->gij", qh, k) * scale
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            visible = torch.arange(L, device=q.device)[None, :] <= (L - n + i)[:, None]  # [n, L]
            logits = logits.masked_fill(~visible[None], float("-inf"))
            out[b, h * group : (h + 1) * group] = torch.einsum("gij,jd->gid", torch.softmax(logits, dim=-1), v)
    return out.to(q.dtype)
