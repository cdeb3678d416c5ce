"""The attention a model runs with a budget policy: its own, except where the cache says otherwise.

Transformers picks each attention module's function by ``config._attn_implementation`` from its
attention-function registry (``AttentionInterface``). A cache whose policy gives layers or heads
different budgets (:mod:`snapkv_ext.policies`) registers ``snapkv+<original>`` there (and the
original's mask function under the same name) and sets the model's implementation to it once
(:func:`route`). That function is the model's original attention for every call, with two
exceptions, both recognised by the key tensor a SnapKV layer's ``update`` returned (:func:`mark`):

- a ragged layer's decode: the keys are its flat per-head store; the attention is
  :func:`snapkv_ext.ops.ragged_attention` over each head's own entries (GQA: a group's query heads
  share their KV head's), fp32 softmax;
- a dense layer shorter than the mask (layers keep different budgets, and the model builds one
  mask, for the longest: ``SnapKVCache.get_mask_sizes``): the mask's last columns are its own.

Any other cache (``DynamicCache``, ...) sees exactly the original attention.

A cache with a decode budget routes the model too, to see the queries: before a layer's attention
the cache may ask for them (:func:`tap`), and the routed function hands its ``query`` (post-RoPE,
``[B, H_q, n, D]``) to the callback before attending, instead of the cache projecting the hidden
states a second time.

A layer-major prefill (:mod:`snapkv_ext.prefill`) routes the model for its run and, where
:func:`chunk_attention_applies`, runs each chunk inside :func:`unmasked_chunks`: the mask
functions build no mask, and the attention runs the chunk against the keys before it unmasked
and against its own block causally, merged by log-sum-exp (:func:`chunk_attention`), with a GQA
group's query heads folded into rows rather than the KV heads repeated.
"""
from __future__ import annotations

import sys
import threading
import weakref
from contextlib import contextmanager
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

PREFIX = "snapkv+"
_ROUTABLE = ("sdpa", "eager")
_marks: dict = {}
_taps: dict = {}  # id(attention module) -> callback(query) for its next call (tap)
_lock = threading.Lock()
_local = threading.local()  # .chunks: inside unmasked_chunks() on this thread


class RaggedKV(NamedTuple):
    """What a ragged layer's keys stand for: segment ``(b, h)`` is rows ``starts[b, h]`` ..
    ``+ lengths[b, h]`` of the flat store, the last ``new`` of them this forward's tokens."""

    starts: Tensor
    lengths: Tensor
    new: int
    values: Tensor
    reference: bool


def mark(keys: Tensor, info) -> None:
    """Remember what ``keys`` (returned by a layer's update) is, for the attention about to run."""
    with _lock:
        if len(_marks) > 256:  # entries whose attention never ran (e.g. a model not routed)
            for k in [k for k, (ref, _) in _marks.items() if ref() is None]:
                del _marks[k]
        _marks[id(keys)] = (weakref.ref(keys), info)


def _take(keys: Tensor):
    with _lock:
        entry = _marks.pop(id(keys), None)
    if entry is None or entry[0]() is not keys:
        return None
    return entry[1]


def routable(model) -> bool:
    """Whether :func:`route` can wrap ``model``'s attention (sdpa or eager, or routed already)."""
    return all(cfg._attn_implementation is None or cfg._attn_implementation.startswith(PREFIX)
               or cfg._attn_implementation in _ROUTABLE for cfg in _configs(model))


def taps_queries(module) -> bool:
    """Whether ``module``'s next call runs through a routed attention function (which honours :func:`tap`)."""
    impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
    return isinstance(impl, str) and impl.startswith(PREFIX)


def tap(module, callback) -> None:
    """Hand ``module``'s queries at its next attention call to ``callback`` (once). Only for a
    module that :func:`taps_queries`."""
    _taps[id(module)] = callback


def _original_function(module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":  # each modeling file has its own eager attention (soft-cap, sinks, ...)
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"snapkv routing: {type(module).__name__} has no eager_attention_forward in its module")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _ragged(module, query: Tensor, keys: Tensor, info: RaggedKV, scaling, kwargs):
    from . import ops, reference

    scale = float(scaling if scaling is not None else module.scaling)
    softcap = getattr(module, "attn_logit_softcapping", None)
    fn = reference.ragged_attention if info.reference else ops.ragged_attention
    out = fn(query, keys, info.values, info.starts, info.lengths, scale, softcap)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------- layer-major chunks


def chunk_attention_applies(model, attention, padded: bool) -> bool:
    """Whether a layer-major chunk of ``attention`` (an :class:`~snapkv_ext.adapters.AttentionLayer`)
    can run as :func:`chunk_attention`: on the CPU (whose flash kernel returns the log-sum-exp),
    under the model's ``sdpa`` attention, on a global layer without a logit soft-cap or attention
    sinks, in a batch without padding. Otherwise the chunk runs the model's own masked attention."""
    p = next(model.parameters())
    m = attention.module
    return (p.device.type == "cpu" and original_implementation(model) == "sdpa" and not padded
            and attention.softcap is None and attention.sliding_window is None
            and getattr(m, "sinks", None) is None and p.dtype in (torch.float32, torch.bfloat16, torch.float16))


@contextmanager
def unmasked_chunks():
    """Within: the routed mask functions return no mask and the routed attention runs
    :func:`chunk_attention` (one layer runs per forward: :mod:`snapkv_ext.prefill`)."""
    _local.chunks = True
    try:
        yield
    finally:
        _local.chunks = False


def _flash_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tuple[Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def chunk_attention(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
    """Attention of a chunk's queries ``[B, H_q, c, D]`` at positions ``L - c .. L - 1`` over the
    layer's keys so far ``[B, H_kv, L, D]``: what the model's causal attention gives, without a
    ``c x L`` mask. The keys before the chunk are all visible (one unmasked pass, the group's
    ``H_q / H_kv`` query heads as rows of their KV head); the chunk's own ``c x c`` block is causal;
    the two are merged by their log-sum-exp in float32. Returns ``[B, H_q, c, D_v]``."""
    B, Hq, c, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    g, s = Hq // Hkv, L - c
    if value.shape[-1] != D or query.device.type != "cpu":  # the flash kernel's limits: masked, as the model
        mask = torch.arange(L, device=key.device) <= torch.arange(s, L, device=key.device)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(
            query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1), attn_mask=mask, scale=scale)
    k_own, v_own = key[:, :, s:], value[:, :, s:]
    if g > 1:  # the c x c block: its c keys repeated per query head (not the L before it)
        k_own = k_own[:, :, None].expand(B, Hkv, g, c, D).reshape(B, Hq, c, D)
        v_own = v_own[:, :, None].expand(B, Hkv, g, c, v_own.shape[-1]).reshape(B, Hq, c, -1)
    out, lse = _flash_lse(query, k_own, v_own, scale, True)
    if s == 0:
        return out
    prior, lse_p = _flash_lse(query.reshape(B, Hkv, g * c, D), key[:, :, :s], value[:, :, :s], scale, False)
    prior, lse_p = prior.reshape(B, Hq, c, -1), lse_p.reshape(B, Hq, c)
    total = torch.logaddexp(lse, lse_p)
    w_own, w_prior = (lse - total).exp_().unsqueeze(-1), (lse_p - total).exp_().unsqueeze(-1)
    if out.dtype == torch.float32:
        return out.mul_(w_own).addcmul_(prior, w_prior)
    return (out.float().mul_(w_own).addcmul_(prior.float(), w_prior)).to(query.dtype)


def _make(name: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if _taps:
            callback = _taps.pop(id(module), None)
            if callback is not None:
                callback(query)
        if getattr(_local, "chunks", False):
            if attention_mask is not None or query.shape[2] > key.shape[2]:
                raise RuntimeError("snapkv routing: a layer-major chunk got a mask or more queries than keys")
            scale = float(scaling if scaling is not None else module.scaling)
            return chunk_attention(query, key, value, scale).transpose(1, 2).contiguous(), None
        info = _take(key)
        if isinstance(info, RaggedKV):
            return _ragged(module, query, key, info, scaling, kwargs)
        if (info is not None and isinstance(attention_mask, Tensor) and attention_mask.dim() == 4
                and attention_mask.shape[-1] > key.shape[-2]):
            attention_mask = attention_mask[..., attention_mask.shape[-1] - key.shape[-2]:]
        return _original_function(module, name)(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)

    attention.__name__ = f"snapkv_{name}_attention"
    return attention


def _register(name: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    routed = PREFIX + name
    if routed not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(routed, _make(name))
        AttentionMaskInterface.register(routed, _mask(ALL_MASK_ATTENTION_FUNCTIONS[name]))
    return routed


def _mask(original):
    def mask(*args, **kwargs):
        return None if getattr(_local, "chunks", False) else original(*args, **kwargs)

    mask.__name__ = f"snapkv_{getattr(original, '__name__', 'mask')}"
    return mask


def _configs(model):
    cfg = model.config
    seen = [cfg]
    if hasattr(cfg, "get_text_config"):
        text = cfg.get_text_config()
        if text is not cfg:
            seen.append(text)
    return seen


def route(model) -> None:
    """Run ``model``'s attention through ``snapkv+<its implementation>`` (idempotent); refuse in
    one line an implementation this cannot wrap."""
    for cfg in _configs(model):
        impl = cfg._attn_implementation
        if impl is None or impl.startswith(PREFIX):
            continue
        if impl not in _ROUTABLE:
            raise ValueError(f"a budget policy other than 'snapkv' needs the model's attention to be one of "
                             f"{', '.join(_ROUTABLE)}, got {impl!r} (load it with attn_implementation='sdpa')")
        cfg._attn_implementation = _register(impl)


@contextmanager
def routed(model):
    """``model`` routed for the block (:func:`route`), as it was after: a model that was not
    routed before is not routed after."""
    before = [(cfg, cfg._attn_implementation) for cfg in _configs(model)]
    route(model)
    try:
        yield
    finally:
        for cfg, impl in before:
            cfg._attn_implementation = impl


def original_implementation(model) -> Optional[str]:
    impl = model.config._attn_implementation
    return impl[len(PREFIX):] if impl and impl.startswith(PREFIX) else impl
