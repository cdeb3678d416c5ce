"""Typed wrappers over ``torch.ops.snapkv.*`` and their fake (meta) implementations.

Shapes: B batch, H_q query heads, H_kv key/value heads (``H_q % H_kv == 0``), L prompt length,
D head dim, w observation window, k kept prefix positions, C = k + w kept entries per KV head.
Every op runs on CPU and, when the CUDA kernels are built, on CUDA; every op checks its
arguments and raises ``RuntimeError`` naming the bad one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.snapkv.*)

_ops = torch.ops.snapkv


def has_cuda_kernels() -> bool:
    """True if the library was built with its CUDA kernels (whether or not a GPU is present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("snapkv::window_scores", "CUDA")


def window_scores(
    q_window: Tensor,
    keys: Tensor,
    pad_lengths: Optional[Tensor] = None,
    group_reduce: str = "mean",
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> Tensor:
    """SnapKV votes of the observation window for every prefix position, per KV head.

    Parameters
    ----------
    q_window : Tensor [B, H_q, w, D]
        Queries of the last w prompt tokens, after RoPE (and any query norm).
    keys : Tensor [B, H_kv, L, D]
        All prompt keys after RoPE; same dtype (float32/float16/bfloat16) and device.
    pad_lengths : Tensor [B] int64, optional
        Left padding of each row (values in ``[0, L - w]``): those key positions take no part
        in the softmax and score 0.
    group_reduce : {"mean", "max", "sum"}
        How the query heads of one GQA group are combined.
    scale : float, optional
        Logit scale, ``1 / sqrt(D)`` by default.
    softcap : float, optional
        Logit soft-capping (Gemma 2's ``attn_logit_softcapping``): the scaled logit x becomes
        ``softcap * tanh(x / softcap)`` before the mask and the softmax. Finite and positive;
        ``None`` (the default) for no cap.

    Returns
    -------
    Tensor [B, H_kv, L - w] float32
        ``reduce_g mean_i softmax_j(cap(q_{g,i} . k_j * scale))`` over the keys window query i
        sees (causal inside the window), for the prefix positions ``j < L - w``; ``cap`` is the
        identity without ``softcap``. The [B, H_q, w, L] attention matrix is never materialised.
    """
    return _ops.window_scores(q_window, keys, pad_lengths, group_reduce, scale, softcap)


def pool_scores(
    scores: Tensor, kernel_size: int, pooling: str = "max", pad_lengths: Optional[Tensor] = None
) -> Tensor:
    """1-D pooling over positions: odd ``kernel_size``, stride 1, padding ``kernel_size // 2``.

    Same values as ``F.max_pool1d`` / ``F.avg_pool1d`` (``count_include_pad=True``) with those
    arguments. ``scores`` is ``[B, H, N]`` (float32/float16/bfloat16); the result has its shape
    and dtype. With ``pad_lengths [B]``, positions ``< pad_lengths[b]`` are set to ``-inf``
    after pooling, so a padded position is never selected.
    """
    return _ops.pool_scores(scores, kernel_size, pooling, pad_lengths)


def select_topk(scores: Tensor, k: int) -> Tensor:
    """Indices ``[B, H, k]`` int64 of the k best positions of each row of ``scores [B, H, N]``.

    Sorted by position (not by score); ties go to the lower position; NaN ranks last.
    """
    return _ops.select_topk(scores, k)


def compact(keys: Tensor, values: Tensor, indices: Tensor, window_size: int) -> Tuple[Tensor, Tensor]:
    """Gather the selected rows, then the last ``window_size`` rows.

    ``keys``/``values`` ``[B, H_kv, L, D]``, ``indices [B, H_kv, k]`` int64 in ``[0, L - w)``.
    Returns keys and values ``[B, H_kv, k + w, D]``.
    """
    return _ops.compact(keys, values, indices, window_size)


def compact_into(
    keys: Tensor, values: Tensor, indices: Tensor, window_size: int, keys_out: Tensor, values_out: Tensor
) -> None:
    """:func:`compact` into caller-owned ``keys_out``/``values_out`` ``[B, H_kv, k + w, D]``.

    The outputs may be views (e.g. the front of a larger preallocated cache) as long as their
    last dim is contiguous.
    """
    _ops.compact_into(keys, values, indices, window_size, keys_out, values_out)


def snapkv_compress(
    q_window: Tensor,
    keys: Tensor,
    values: Tensor,
    max_capacity_prompt: int,
    kernel_size: int = 7,
    pooling: str = "max",
    group_reduce: str = "mean",
    pad_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The whole SnapKV step for one layer: score, pool, select, compact.

    ``q_window [B, H_q, w, D]``, ``keys``/``values`` ``[B, H_kv, L, D]``. Keeps the
    ``max_capacity_prompt - w`` best prefix positions per KV head (in position order) plus the
    window. Returns ``(keys, values, positions)`` of shapes ``[B, H_kv, C', D]`` (twice) and
    ``[B, H_kv, C']`` int64, ``C' = min(L, max_capacity_prompt)``. When ``L <=
    max_capacity_prompt`` nothing is dropped: the results are copies of the inputs and
    ``positions`` is ``0..L-1``. With padding, a row with fewer valid prefix positions than
    ``k`` keeps all of them plus its lowest padded positions, so the row stays left-padded.
    ``scale`` and ``softcap`` (e.g. Gemma 2's logit cap) shape the logits as in
    :func:`window_scores`.
    """
    return _ops.snapkv_compress(
        q_window, keys, values, max_capacity_prompt, kernel_size, pooling, group_reduce, pad_lengths, scale, softcap
    )


def snapkv_compress_into(
    q_window: Tensor,
    keys: Tensor,
    values: Tensor,
    max_capacity_prompt: int,
    keys_out: Tensor,
    values_out: Tensor,
    kernel_size: int = 7,
    pooling: str = "max",
    group_reduce: str = "mean",
    pad_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> Tensor:
    """:func:`snapkv_compress` into caller-owned ``keys_out``/``values_out`` ``[B, H_kv, C', D]``,
    ``C' = min(L, max_capacity_prompt)``: e.g. the front of a preallocated cache, so the
    compressed KV is written once, where it will live, with no temporary of its size.

    The outputs may be strided views (last dim contiguous) and must not share memory with the
    inputs. Returns the kept positions ``[B, H_kv, C']`` int64.
    """
    return _ops.snapkv_compress_into(
        q_window, keys, values, max_capacity_prompt, keys_out, values_out, kernel_size, pooling, group_reduce,
        pad_lengths, scale, softcap,
    )


# ---- fake (meta) implementations: shapes only, for torch.compile and opcheck ----


@torch.library.register_fake("snapkv::window_scores")
def _window_scores_fake(q_window, keys, pad_lengths=None, group_reduce="mean", scale=None, softcap=None):
    B, H_kv, L, _ = keys.shape
    return keys.new_empty((B, H_kv, L - q_window.shape[2]), dtype=torch.float32)


@torch.library.register_fake("snapkv::pool_scores")
def _pool_scores_fake(scores, kernel_size, pooling="max", pad_lengths=None):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("snapkv::select_topk")
def _select_topk_fake(scores, k):
    return scores.new_empty((scores.shape[0], scores.shape[1], k), dtype=torch.int64)


@torch.library.register_fake("snapkv::compact")
def _compact_fake(keys, values, indices, window_size):
    shape = (keys.shape[0], keys.shape[1], indices.shape[2] + window_size, keys.shape[3])
    return keys.new_empty(shape), values.new_empty(shape)


@torch.library.register_fake("snapkv::compact_into")
def _compact_into_fake(keys, values, indices, window_size, keys_out, values_out):
    return None


@torch.library.register_fake("snapkv::snapkv_compress")
def _snapkv_compress_fake(
    q_window, keys, values, max_capacity_prompt, kernel_size=7, pooling="max", group_reduce="mean",
    pad_lengths=None, scale=None, softcap=None,
):
    B, H_kv, L, D = keys.shape
    c = min(L, max_capacity_prompt)
    return keys.new_empty((B, H_kv, c, D)), values.new_empty((B, H_kv, c, D)), keys.new_empty(
        (B, H_kv, c), dtype=torch.int64
    )


@torch.library.register_fake("snapkv::snapkv_compress_into")
def _snapkv_compress_into_fake(
    q_window, keys, values, max_capacity_prompt, keys_out, values_out, kernel_size=7, pooling="max",
    group_reduce="mean", pad_lengths=None, scale=None, softcap=None,
):
    B, H_kv, L, _ = keys.shape
    return keys.new_empty((B, H_kv, min(L, max_capacity_prompt)), dtype=torch.int64)
