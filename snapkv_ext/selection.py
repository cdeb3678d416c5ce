"""A selection: which of a layer's entries the scorer and the budget policy keep.

Stateless, apart from the layers that hold what is kept (:mod:`snapkv_ext.layers`, the stores):
each function takes the settings (:class:`snapkv_ext.config.SnapKVConfig`: scorer, policy, kernel,
pooling), the layer's attention (its scale and soft-cap, so that the scores are the model's own),
what the pre-attention hook handed the layer (:class:`PendingSelection`) and the tensors.

- :func:`compress_into`: the same count for every KV head (the dense store), written straight into
  the store's buffers; SnapKV's own scorer runs fused in one native op.
- :func:`keep_mask`: each KV head its policy's count (the ragged store).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops, policies, reference, scorers
from .adapters import AttentionLayer
from .config import SnapKVConfig

__all__ = ["PendingSelection", "clamp_padding", "scores", "compress_into", "keep_mask"]


class PendingSelection(NamedTuple):
    """What the pre-attention hook hands a layer right before the ``update`` that selects."""

    q_window: Tensor  # [B, H_q, w, D] post-RoPE queries of the observation window
    pad_lengths: Optional[Tensor]  # [B] int64 left padding of each row, or None
    max_capacity_prompt: int  # kept entries per KV head, window included


def clamp_padding(pad: Optional[Tensor], L: int, w: int) -> Optional[Tensor]:
    """Left padding ``[B]`` clamped to the prefix ``L - w`` (a row shorter than the window keeps all
    it has, its window covering padding too), or None where no row is padded."""
    if pad is None:
        return None
    pad = pad.clamp(max=L - w)
    return pad if bool((pad > 0).any()) else None


def scores(config: SnapKVConfig, attention: AttentionLayer, pending: PendingSelection, keys: Tensor,
           values: Tensor, pad: Optional[Tensor]) -> Tensor:
    """The configured scorer's ``[B, H_kv, L - w]`` scores of (keys, values) with the attention's
    own logit transform (``pad``: left padding up to ``L - w``, or None)."""
    q = pending.q_window.to(keys.dtype)
    B, H, L = keys.shape[:3]
    inp = scorers.ScoreInput(keys, values, q, pad, attention.scale, attention.softcap, config)
    return scorers.check_scores(config.scorer, config.scorer.score(inp), (B, H, L - q.shape[2]))


def compress_into(config: SnapKVConfig, attention: AttentionLayer, pending: PendingSelection, keys: Tensor,
                  values: Tensor, keys_out: Tensor, values_out: Tensor) -> Tensor:
    """The selection over (keys, values) (the scorer's best ``max_capacity_prompt - w`` prefix
    entries of each head, then the window), written into the outputs; -> the kept indices
    ``[B, H_kv, C]``. SnapKV's own scorer runs fused (scores, pooling, top-k and gather in one op)."""
    L, w = keys.shape[2], pending.q_window.shape[2]
    pad = clamp_padding(pending.pad_lengths, L, w)
    if type(config.scorer) is scorers.SnapKV:
        fn = reference.snapkv_compress_into if config.use_reference else ops.snapkv_compress_into
        return fn(pending.q_window.to(keys.dtype), keys, values, pending.max_capacity_prompt, keys_out,
                  values_out, config.kernel_size, config.pooling, config.group_reduce, pad, scale=attention.scale,
                  softcap=attention.softcap)
    B, H = keys.shape[:2]
    s = scores(config, attention, pending, keys, values, pad).float()
    if pad is not None:  # left padding ranks after every real entry
        j = torch.arange(L - w, device=s.device)
        s = s.masked_fill((j[None, :] < pad.to(s.device)[:, None])[:, None, :], float("-inf"))
    if config.use_reference:
        idx = reference.select_topk(s, pending.max_capacity_prompt - w)
        k_out, v_out = reference.compact(keys, values, idx, w)
        keys_out.copy_(k_out)
        values_out.copy_(v_out)
    else:
        idx = ops.select_topk(s, pending.max_capacity_prompt - w)
        ops.compact_into(keys, values, idx, w, keys_out, values_out)
    win = torch.arange(L - w, L, device=keys.device).expand(B, H, w)
    return torch.cat([idx, win], dim=2)


def keep_mask(config: SnapKVConfig, pending: PendingSelection, scores: Tensor, pad: Optional[Tensor]) -> Tensor:
    """``[B, H_kv, L]`` bool: the entries each KV head keeps, its count from the policy given
    ``scores [B, H_kv, L - w]`` (``pad``: left padding ``[B]`` or ``[B, H_kv]``, or None), the window
    always kept."""
    B, H, P = scores.shape
    w = pending.q_window.shape[2]
    valid = policies.valid_prefix(pad, B, H, P, scores.device)
    budget = pending.max_capacity_prompt - w
    counts = policies.check_counts(config.policy, config.policy.head_counts(scores, budget, valid), budget, valid,
                                   (B, H))
    return policies.keep_mask(scores, counts, pad, w)
