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
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor

PREFIX = "snapkv+"
_ROUTABLE = ("sdpa", "eager")
_marks: dict = {}
_lock = threading.Lock()


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


def _make(name: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
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
        AttentionMaskInterface.register(routed, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return routed


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


def original_implementation(model) -> Optional[str]:
    impl = model.config._attn_implementation
    return impl[len(PREFIX):] if impl and impl.startswith(PREFIX) else impl
