"""Typed wrappers over ``torch.ops.snapkv.*`` and their fake (meta) implementations.

Shapes: B batch, H_q query heads, H_kv key/value heads (``H_q % H_kv == 0``), L prompt length,
D head dim, w observation window, k kept prefix positions, C = k + w kept entries per KV head.
Every op runs on CPU and, when the CUDA kernels are built, on CUDA; every op checks its
arguments and raises ``RuntimeError`` naming the bad one.
"""
from __future__ import annotations

import math
import struct
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
    Returns keys and values ``[B, H_kv, k + w, D]``. (``torch.ops.snapkv.compact`` is the same op.)
    """
    return _compact(keys, values, indices, window_size)


# ---- the allocating ops, torch.ops.snapkv.compact and .snapkv_compress: defined here over the
# native _into ops, which check every argument (same messages as the fakes below) and fill the
# outputs. The typed wrappers call the bodies directly (no second trip through the dispatcher).


def _compact(keys: Tensor, values: Tensor, indices: Tensor, window_size: int) -> Tuple[Tensor, Tensor]:
    if keys.dim() != 4 or indices.dim() != 3 or not 1 <= window_size < keys.shape[2]:
        _check_compact(keys, values, indices, window_size)  # the outputs' shape needs these: raise here
    keys_out, values_out = _kv_outputs(keys, indices.shape[2] + window_size)
    _ops.compact_into(keys, values, indices, window_size, keys_out, values_out)
    return keys_out, values_out


def _snapkv_compress(q_window: Tensor, keys: Tensor, values: Tensor, max_capacity_prompt: int, kernel_size: int = 7,
                     pooling: str = "max", group_reduce: str = "mean", pad_lengths: Optional[Tensor] = None,
                     scale: Optional[float] = None, softcap: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    if keys.dim() != 4 or q_window.dim() != 4 or max_capacity_prompt < 1:
        _check_compress(q_window, keys, values, max_capacity_prompt, kernel_size, pooling, group_reduce,
                        pad_lengths, scale, softcap)
    keys_out, values_out = _kv_outputs(keys, min(keys.shape[2], max_capacity_prompt))
    positions = _ops.snapkv_compress_into(q_window, keys, values, max_capacity_prompt, keys_out, values_out,
                                          kernel_size, pooling, group_reduce, pad_lengths, scale, softcap)
    return keys_out, values_out, positions


def _kv_outputs(keys: Tensor, rows: int) -> Tuple[Tensor, Tensor]:
    shape = (keys.shape[0], keys.shape[1], rows, keys.shape[3])
    return keys.new_empty(shape), keys.new_empty(shape)


_compact_op = torch.library.custom_op(
    "snapkv::compact", _compact, mutates_args=(),
    schema="(Tensor keys, Tensor values, Tensor indices, int window_size) -> (Tensor, Tensor)")
_snapkv_compress_op = torch.library.custom_op(
    "snapkv::snapkv_compress", _snapkv_compress, mutates_args=(),
    schema="(Tensor q_window, Tensor keys, Tensor values, int max_capacity_prompt, int kernel_size=7, "
           "str pooling='max', str group_reduce='mean', Tensor? pad_lengths=None, float? scale=None, "
           "float? softcap=None) -> (Tensor, Tensor, Tensor)")


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
    :func:`window_scores`. (``torch.ops.snapkv.snapkv_compress`` is the same op.)
    """
    return _snapkv_compress(
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


def ragged_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    starts: Tensor,
    lengths: Tensor,
    scale: float,
    softcap: Optional[float] = None,
) -> Tensor:
    """Causal attention of the n newest queries over a ragged, per-head KV store (decoding with
    per-head budgets: every KV head keeps its own number of entries).

    Parameters
    ----------
    q : Tensor [B, H_q, n, D]
        Queries of the n new tokens (n = 1 when decoding), after RoPE; float32/float16/bfloat16,
        last dim contiguous (other strides arbitrary).
    keys, values : Tensor [N, D]
        The flat store, same dtype and device as ``q``, rows contiguous (the row stride may exceed
        D). It holds every (batch row, KV head) segment and may have unused rows between them.
    starts, lengths : Tensor [B, H_kv] int64
        Segment (b, h) is rows ``starts[b, h] .. starts[b, h] + lengths[b, h] - 1`` in position
        order; its last n rows are the n new tokens. Needs ``lengths >= n``, ``starts >= 0`` and
        ``starts + lengths <= N`` (checked; on CUDA the check reads the values: one host sync).
        ``H_q % H_kv == 0``: query head hq reads KV head ``hq // (H_q // H_kv)``.
    scale : float
        Logit scale (the attention module's ``scaling``, e.g. ``1 / sqrt(D)``); finite, positive.
    softcap : float, optional
        Logit soft-capping (Gemma 2): the scaled logit x becomes ``softcap * tanh(x / softcap)``.

    Returns
    -------
    Tensor [B, H_q, n, D], dtype of ``q``, contiguous
        ``sum_j softmax_j(cap(scale * q_i . k_j)) v_j`` over segment entries ``j <= lengths - n + i``
        for new token i (every segment row is a valid entry: no padding mask), softmax and
        accumulation in fp32.
    """
    return _ops.ragged_attention(q, keys, values, starts, lengths, scale, softcap)


# ---- fake (meta) implementations, for torch.compile and opcheck ----
# They check what csrc/checks.cpp checks about shapes, dtypes, devices and scalar arguments, with
# the same messages, so a wrong call fails while tracing as it would at run time. Checks of tensor
# values (pad_lengths and indices in range) and of memory overlap need the data: run time only.

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond, message) -> None:
    """torch._check (a RuntimeError; with symbolic sizes a guard) with the kernels' message."""
    torch._check(cond, lambda: "snapkv: " + message())


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_float(t: Tensor, name: str) -> None:
    _check(t.dtype in _FLOAT_DTYPES, lambda: f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _as_float32(x: float) -> float:
    """x as the kernels' float: 0 below its range, +-inf above."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.inf if x > 0 else -math.inf


def _check_pad(pad: Optional[Tensor], B, like: Tensor) -> None:
    if pad is None:
        return
    _check(pad.dtype == torch.int64, lambda: f"pad_lengths must be int64, got {pad.dtype}")
    _check(pad.dim() == 1 and pad.shape[0] == B, lambda: f"pad_lengths must be [B] = [{B}], got {_shape(pad)}")
    _check(pad.device == like.device,
           lambda: f"pad_lengths must be on {like.device} like the other inputs, got {pad.device}")


def _check_window(q: Tensor, keys: Tensor, pad: Optional[Tensor], group_reduce: str, scale, softcap) -> None:
    _check(q.dim() == 4, lambda: f"q_window must be [B, H_q, w, D], got {_shape(q)}")
    _check(keys.dim() == 4, lambda: f"keys must be [B, H_kv, L, D], got {_shape(keys)}")
    _check_float(q, "q_window")
    _check_float(keys, "keys")
    _check(q.dtype == keys.dtype, lambda: f"q_window and keys must have the same dtype, got {q.dtype} and {keys.dtype}")
    _check(q.device == keys.device,
           lambda: f"q_window and keys must be on the same device, got {q.device} and {keys.device}")
    B, H_q, w, D = q.shape
    H_kv, L = keys.shape[1], keys.shape[2]
    _check(keys.shape[0] == B,
           lambda: f"q_window and keys must have the same batch size, got {_shape(q)} and {_shape(keys)}")
    _check(keys.shape[3] == D,
           lambda: f"q_window and keys must have the same head dim D, got {_shape(q)} and {_shape(keys)}")
    _check(B > 0 and H_q > 0 and H_kv > 0 and D > 0,
           lambda: f"q_window and keys must be non-empty, got {_shape(q)} and {_shape(keys)}")
    _check(H_q % H_kv == 0, lambda: f"H_q must be a multiple of H_kv (GQA), got H_q = {H_q} and H_kv = {H_kv}")
    _check(w >= 1, lambda: f"the window (q_window.size(2)) must be at least 1, got {w}")
    _check(w < L, lambda: f"the window w = q_window.size(2) must be smaller than L = keys.size(2), got w = {w} "
                          f"and L = {L}")
    _check_pad(pad, B, keys)
    _check(group_reduce in ("mean", "max", "sum"),
           lambda: f"group_reduce must be 'mean', 'max' or 'sum', got '{group_reduce}'")
    _check(scale is None or (math.isfinite(scale) and scale > 0),
           lambda: f"scale must be finite and positive, got {scale}")
    _check(softcap is None or (math.isfinite(_as_float32(softcap)) and _as_float32(softcap) > 0),
           lambda: f"softcap must be None or finite and positive, got {softcap}")


def _check_scores(scores: Tensor) -> None:
    _check(scores.dim() == 3, lambda: f"scores must be [B, H, N], got {_shape(scores)}")
    _check_float(scores, "scores")
    _check(scores.numel() > 0, lambda: f"scores must be non-empty, got {_shape(scores)}")


def _check_kernel_size(kernel_size: int) -> None:
    _check(kernel_size > 0 and kernel_size % 2 == 1,
           lambda: f"kernel_size must be a positive odd integer, got {kernel_size}")


def _check_pooling(pooling: str) -> None:
    _check(pooling in ("max", "avg"), lambda: f"pooling must be 'max' or 'avg', got '{pooling}'")


def _check_values(keys: Tensor, values: Tensor) -> None:
    _check(values.shape == keys.shape,
           lambda: f"values must have the shape of keys {_shape(keys)}, got {_shape(values)}")
    _check(values.dtype == keys.dtype, lambda: f"values must have the dtype of keys ({keys.dtype}), got {values.dtype}")
    _check(values.device == keys.device,
           lambda: f"values must have the dtype and device of keys ({keys.dtype}, {keys.device}), got "
                   f"{values.dtype}, {values.device}")


def _check_compact(keys: Tensor, values: Tensor, indices: Tensor, window_size: int) -> None:
    _check(keys.dim() == 4, lambda: f"keys must be [B, H_kv, L, D], got {_shape(keys)}")
    _check_float(keys, "keys")
    _check_values(keys, values)
    _check(indices.device == keys.device,
           lambda: f"keys, values and indices must be on the same device, got {keys.device}, {values.device} "
                   f"and {indices.device}")
    _check(keys.numel() > 0, lambda: f"keys must be non-empty, got {_shape(keys)}")
    L = keys.shape[2]
    _check(1 <= window_size and window_size < L,
           lambda: f"window_size must be in [1, L - 1] with L = {L}, got {window_size}")
    _check(indices.dtype == torch.int64, lambda: f"indices must be int64, got {indices.dtype}")
    _check(indices.dim() == 3 and indices.shape[0] == keys.shape[0] and indices.shape[1] == keys.shape[1],
           lambda: f"indices must be [B, H_kv, k] = [{keys.shape[0]}, {keys.shape[1]}, k], got {_shape(indices)}")
    _check(indices.shape[2] <= L - window_size,
           lambda: f"indices must select at most L - window_size = {L - window_size} positions, got "
                   f"k = {indices.shape[2]}")


def _check_kv_out(keys: Tensor, rows, rows_name: str, keys_out: Tensor, values_out: Tensor) -> None:
    want = [keys.shape[0], keys.shape[1], rows, keys.shape[3]]
    for name, t in (("keys_out", keys_out), ("values_out", values_out)):
        _check(t.dim() == 4 and list(t.shape) == want,
               lambda: f"{name} must be [B, H_kv, {rows_name}, D] = {want}, got {_shape(t)}")
        _check(t.dtype == keys.dtype, lambda: f"{name} must have the dtype of keys ({keys.dtype}), got {t.dtype}")
        _check(t.device == keys.device, lambda: f"{name} must be on {keys.device}, got {t.device}")
        _check(t.stride(3) == 1, lambda: f"{name} must be contiguous in its last dim, got strides {list(t.stride())}")


def _check_compress(q_window, keys, values, max_capacity_prompt, kernel_size, pooling, group_reduce, pad_lengths,
                    scale, softcap) -> None:
    _check_window(q_window, keys, pad_lengths, group_reduce, scale, softcap)
    _check_values(keys, values)
    w = q_window.shape[2]
    _check(max_capacity_prompt > w,
           lambda: f"max_capacity_prompt must be larger than the window w = {w}, got {max_capacity_prompt}")
    _check_kernel_size(kernel_size)
    _check_pooling(pooling)


@torch.library.register_fake("snapkv::window_scores")
def _window_scores_fake(q_window, keys, pad_lengths=None, group_reduce="mean", scale=None, softcap=None):
    _check_window(q_window, keys, pad_lengths, group_reduce, scale, softcap)
    B, H_kv, L, _ = keys.shape
    return keys.new_empty((B, H_kv, L - q_window.shape[2]), dtype=torch.float32)


@torch.library.register_fake("snapkv::pool_scores")
def _pool_scores_fake(scores, kernel_size, pooling="max", pad_lengths=None):
    _check_scores(scores)
    _check_kernel_size(kernel_size)
    _check_pad(pad_lengths, scores.shape[0], scores)
    _check_pooling(pooling)
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("snapkv::select_topk")
def _select_topk_fake(scores, k):
    _check_scores(scores)
    N = scores.shape[2]
    _check(0 <= k and k <= N, lambda: f"k must be in [0, N = scores.size(2) = {N}], got {k}")
    return scores.new_empty((scores.shape[0], scores.shape[1], k), dtype=torch.int64)


@_compact_op.register_fake
def _compact_fake(keys, values, indices, window_size):
    _check_compact(keys, values, indices, window_size)
    return _kv_outputs(keys, indices.shape[2] + window_size)


@torch.library.register_fake("snapkv::compact_into")
def _compact_into_fake(keys, values, indices, window_size, keys_out, values_out):
    _check_compact(keys, values, indices, window_size)
    _check_kv_out(keys, indices.shape[2] + window_size, "k + w", keys_out, values_out)
    return None


@_snapkv_compress_op.register_fake
def _snapkv_compress_fake(
    q_window, keys, values, max_capacity_prompt, kernel_size=7, pooling="max", group_reduce="mean",
    pad_lengths=None, scale=None, softcap=None,
):
    _check_compress(q_window, keys, values, max_capacity_prompt, kernel_size, pooling, group_reduce, pad_lengths,
                    scale, softcap)
    B, H_kv, L, D = keys.shape
    c = min(L, max_capacity_prompt)
    return (*_kv_outputs(keys, c), keys.new_empty((B, H_kv, c), dtype=torch.int64))


@torch.library.register_fake("snapkv::snapkv_compress_into")
def _snapkv_compress_into_fake(
    q_window, keys, values, max_capacity_prompt, keys_out, values_out, kernel_size=7, pooling="max",
    group_reduce="mean", pad_lengths=None, scale=None, softcap=None,
):
    _check_compress(q_window, keys, values, max_capacity_prompt, kernel_size, pooling, group_reduce, pad_lengths,
                    scale, softcap)
    B, H_kv, L, _ = keys.shape
    c = min(L, max_capacity_prompt)
    _check_kv_out(keys, c, "min(L, max_capacity_prompt)", keys_out, values_out)
    return keys.new_empty((B, H_kv, c), dtype=torch.int64)


def _check_ragged(q, keys, values, starts, lengths, scale, softcap) -> None:
    _check(q.dim() == 4, lambda: f"q must be [B, H_q, n, D], got {_shape(q)}")
    _check(keys.dim() == 2, lambda: f"keys must be [N, D], got {_shape(keys)}")
    _check(values.dim() == 2, lambda: f"values must be [N, D], got {_shape(values)}")
    _check_float(q, "q")
    _check(keys.dtype == q.dtype and values.dtype == q.dtype,
           lambda: f"keys and values must have the dtype of q ({q.dtype}), got {keys.dtype} and {values.dtype}")
    _check(keys.device == q.device and values.device == q.device and starts.device == q.device
           and lengths.device == q.device,
           lambda: f"keys, values, starts and lengths must be on the device of q ({q.device}), got {keys.device}, "
                   f"{values.device}, {starts.device} and {lengths.device}")
    B, H_q, n, D = q.shape
    _check(B > 0 and H_q > 0 and n > 0 and D > 0, lambda: f"q must be non-empty, got {_shape(q)}")
    _check(keys.shape[1] == D, lambda: f"keys must be [N, D] with the head dim of q (D = {D}), got {_shape(keys)}")
    _check(values.shape == keys.shape,
           lambda: f"values must have the shape of keys {_shape(keys)}, got {_shape(values)}")
    _check(q.stride(3) == 1 or D == 1, lambda: f"q must be contiguous in its last dim, got strides {list(q.stride())}")
    _check(keys.stride(1) == 1 or D == 1,
           lambda: f"keys must have contiguous rows (stride(1) == 1), got strides {list(keys.stride())}")
    _check(values.stride(1) == 1 or D == 1,
           lambda: f"values must have contiguous rows (stride(1) == 1), got strides {list(values.stride())}")
    _check(starts.dtype == torch.int64, lambda: f"starts must be int64, got {starts.dtype}")
    _check(lengths.dtype == torch.int64, lambda: f"lengths must be int64, got {lengths.dtype}")
    _check(starts.dim() == 2 and starts.shape[0] == B and starts.shape[1] > 0,
           lambda: f"starts must be [B, H_kv] with B = q.size(0) = {B} and H_kv > 0, got {_shape(starts)}")
    _check(lengths.shape == starts.shape,
           lambda: f"lengths must have the shape of starts {_shape(starts)}, got {_shape(lengths)}")
    H_kv = starts.shape[1]
    _check(H_q % H_kv == 0, lambda: f"H_q must be a multiple of H_kv (GQA), got H_q = {H_q} and H_kv = {H_kv}")
    _check(math.isfinite(_as_float32(scale)) and _as_float32(scale) > 0,
           lambda: f"scale must be finite and positive, got {scale}")
    _check(softcap is None or (math.isfinite(_as_float32(softcap)) and _as_float32(softcap) > 0),
           lambda: f"softcap must be None or finite and positive, got {softcap}")


@torch.library.register_fake("snapkv::ragged_attention")
def _ragged_attention_fake(q, keys, values, starts, lengths, scale, softcap=None):
    _check_ragged(q, keys, values, starts, lengths, scale, softcap)
    return q.new_empty(q.shape)
