"""SnapKVCache: a drop-in Transformers cache that compresses the prompt's KV with SnapKV.

    cache = SnapKVCache(model, max_capacity_prompt=1024, window_size=32)
    out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=256)
    print(cache.stats())

How it plugs in (Transformers 5.x public Cache API, no monkeypatching):

- A forward pre-hook on each attention module (installed once per model, inert for any other
  cache) sees the module's input hidden states and rotary embeddings; when the coming ``update``
  of a global layer will select, it computes the real queries of the last ``window_size`` tokens
  (as the module does: see :mod:`snapkv_ext.adapters`) and hands them to that layer.
- A global layer's ``update`` receives the full keys/values, returns them for this forward's
  attention, and stores only SnapKV's selection, scored with the module's own logit transform:
  each layer is compressed right after its own prefill, so at most one layer's full KV exists
  at a time. A sliding-window layer keeps exactly its window (:mod:`snapkv_ext.layers`).
- The cache reports the *logical* length (positions of new tokens continue at L) from
  ``get_seq_length`` and the *physical* one through ``get_mask_sizes``, whose offset maps each
  physical slot onto the 2D attention mask. Compression keeps a left-padded row left-padded, so
  the mask stays right for every row.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from . import routing, stores
from .adapters import AttentionLayer, attention_layers, describe_sharding, tensor_parallel_size
from .config import DEFAULT_KERNEL_SIZE, SnapKVConfig
from .layers import PrefillMemory, SlidingWindowLayer, SnapKVLayer
from .selection import PendingSelection

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - transformers is a declared dependency of the cache
    raise ImportError("snapkv_ext.cache needs transformers>=5.17: pip install 'transformers>=5.17,<6'") from e


# ---------------------------------------------------------------- Transformers glue


@functools.lru_cache(maxsize=None)
def _cache_argument(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> Dict[str, object]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``: the argument is ``cache``
    from Transformers 5.24 on (``past_key_values`` there is deprecated, removed in 5.40/6.0) and
    ``past_key_values`` before. ``model(ids, **cache_kwargs(model, cache))`` works on every 5.x."""
    return {_cache_argument(type(model)): cache}


def masked_prefix(attention_mask, B: int, kv_len: int, device) -> Optional[Tensor]:
    """Number of leading key positions each row's last query cannot see (its left padding),
    from whatever mask a global attention module receives (2D, 4D bool or 4D additive), or None."""
    if attention_mask is None or isinstance(attention_mask, dict):
        return None
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
        visible = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    elif m.dim() == 2:
        visible = m.bool()
    else:
        return None
    visible = visible[:, -kv_len:].to(device)
    if visible.shape[0] != B:
        visible = visible.expand(B, -1)
    pad = kv_len - visible.sum(dim=1)
    # Left padding only: every position after a row's padding must be visible.
    j = torch.arange(kv_len, device=device)
    if not bool(((j[None, :] >= pad[:, None]) == visible).all()):
        raise ValueError("SnapKVCache supports left-padded batches only (tokenizer.padding_side = 'left')")
    return pad.to(torch.int64)


def _pre_attention_hook(module, args, kwargs):
    # Transformers 5.24 renamed the attention modules' `past_key_values` argument to `cache`.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, SnapKVCache):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache._before_attention(module, hidden, kwargs.get("position_embeddings"), kwargs.get("attention_mask"))
    return None


# ---------------------------------------------------------------- the cache


class LayerMajorCache(Cache):
    """A cache a layer-major prefill (:mod:`snapkv_ext.prefill`) can run: while it runs its layers
    are at different lengths, so what the model asks about "the cache" (positions, mask sizes) is
    answered by the layer being run (for the mask of its own kind: global or sliding)."""

    _focus: Optional[int] = None

    def focus(self, layer_idx: Optional[int]) -> None:
        self._focus = layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._focus if self._focus is not None else layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        f = self._focus
        if f is not None and self.layers[f].is_sliding == self.layers[layer_idx].is_sliding:
            layer_idx = f
        return super().get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        super().reset()
        self._focus = None


class SnapKVCache(LayerMajorCache):
    """A Transformers cache that keeps, per global layer and KV head, the prompt entries SnapKV
    selects, and exactly the window on sliding-window layers.

    Parameters
    ----------
    model : PreTrainedModel
        The model the cache will be used with: any family in :data:`snapkv_ext.adapters.FAMILIES`
        (Llama/SmolLM2, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3,
        Phi-3, Granite, OLMo 2). Its attention modules get an inert forward pre-hook (once).
    max_capacity_prompt, window_size, kernel_size, pooling, group_reduce, compression_ratio,
    recompress, use_reference, decode_reserve, policy, scorer, max_capacity_decode, decode_interval, store :
        See :class:`SnapKVConfig`; or pass ``config=SnapKVConfig(...)``. ``max_capacity_decode``
        bounds each layer while generating (re-selected every ``decode_interval`` tokens). ``scorer`` says how
        entries are scored (:mod:`snapkv_ext.scorers`: ``snapkv``, ``streamingllm``, ``keynorm``,
        ``tova``, ``vatp`` or one's own); ``store`` how each layer holds them (:mod:`snapkv_ext.stores`:
        ``dense`` or ``ragged``; unset, what the policy needs). A ``policy`` other than
        ``"snapkv"`` (:mod:`snapkv_ext.policies`), or the ragged store, routes the model's attention through
        :mod:`snapkv_ext.routing` (the model's own attention for everything but this cache's layers).
    """

    def __init__(self, model, max_capacity_prompt: Optional[int] = None, window_size: int = 32,
                 kernel_size: int = DEFAULT_KERNEL_SIZE, pooling: str = "max", *, config: Optional[SnapKVConfig] = None,
                 compression_ratio: Optional[float] = None, group_reduce: str = "mean", recompress: bool = True,
                 use_reference: bool = False, decode_reserve: int = 128, policy="snapkv", scorer="snapkv",
                 max_capacity_decode: Optional[int] = None, decode_interval: int = 64, store=None):
        if config is None:
            config = SnapKVConfig(max_capacity_prompt=max_capacity_prompt, window_size=window_size,
                                  kernel_size=kernel_size, pooling=pooling, group_reduce=group_reduce,
                                  compression_ratio=compression_ratio, recompress=recompress,
                                  use_reference=use_reference, decode_reserve=decode_reserve, policy=policy,
                                  scorer=scorer, max_capacity_decode=max_capacity_decode,
                                  decode_interval=decode_interval, store=store)
        elif not isinstance(config, SnapKVConfig):
            raise ValueError(f"config must be a SnapKVConfig, got {type(config).__name__}")
        self.config = config
        attention = attention_layers(model)
        self._model_name = type(model).__name__
        self._attention = {id(a.module): a for a in attention}
        for a in attention:
            if not getattr(a.module, "_snapkv_hooked", False):
                a.module.register_forward_pre_hook(_pre_attention_hook, with_kwargs=True)
                a.module._snapkv_hooked = True
        if all(a.sliding_window is not None for a in attention):
            warnings.warn(f"SnapKVCache: every layer of {self._model_name} slides over a window "
                          f"({attention[0].sliding_window} tokens); those layers keep their window and "
                          "nothing is compressed", stacklevel=2)
        self.memory = PrefillMemory()
        self._routed = not config.one_layout
        if self._routed or (config.max_capacity_decode is not None and routing.routable(model)):
            # A decode budget takes its window's queries from the routed attention (routing.tap).
            routing.route(model)
        self._global = [a.layer_idx for a in attention if a.sliding_window is None]
        if config.max_capacity_decode is not None:  # the policy's decode budgets: refused now, not mid-generation
            from .policies import check_capacities

            p, w, n = config.policy, config.window_size, len(self._global)
            try:
                check_capacities(p, p.layer_capacities(config.max_capacity_decode, w, n), config.max_capacity_decode, w, n)
            except ValueError as e:
                raise ValueError(f"max_capacity_decode: {e}") from None
        layers = [self._new_layer(a) for a in attention]
        self.memory.layers = layers
        super().__init__(layers=layers)

    def _new_layer(self, attention: AttentionLayer) -> CacheLayerMixin:
        if attention.sliding_window is not None:
            return SlidingWindowLayer(attention.layer_idx, attention.sliding_window, self.memory, attention)
        kind = stores.layer_class(self.config.store)
        return kind(self.config, attention, self.memory, self._model_name,
                    rank=self._global.index(attention.layer_idx), num_global=len(self._global))

    def get_mask_sizes(self, query_length: int, layer_idx: int):
        # Under a policy, global layers hold different lengths and the model builds one mask for
        # them: for the longest; routing gives each dense layer the mask's last columns.
        if self._routed and self._focus is None and isinstance(self.layers[layer_idx], SnapKVLayer):
            layer_idx = max(self._global, key=lambda i: self.layers[i].visible_length())
        return super().get_mask_sizes(query_length, layer_idx)

    # -- called by the hook, right before a layer's attention
    def _before_attention(self, module, hidden_states: Tensor, position_embeddings, attention_mask) -> None:
        attention = self._attention.get(id(module))
        if attention is None:
            theirs, ours = tensor_parallel_size(module), next(iter(self._attention.values())).tp_size
            if theirs != ours:  # e.g. a cache made from the unsharded model, used with the tensor-parallel one
                raise ValueError(f"this SnapKVCache was built for {self._model_name} {describe_sharding(ours)}, and is "
                                 f"used with a model {describe_sharding(theirs)}; create the cache from the model it "
                                 "runs with")
            raise ValueError(f"this SnapKVCache was built for another model ({self._model_name}); create one per model")
        layer = self.layers[attention.layer_idx]
        if not isinstance(layer, SnapKVLayer):
            return
        n = hidden_states.shape[1]
        max_capacity_prompt = layer.selects(n)
        if not max_capacity_prompt:
            if layer.wants_queries(n):  # a decode budget's next window
                if routing.taps_queries(module):  # from the attention call itself
                    routing.tap(module, layer.remember_queries)
                elif position_embeddings is not None:  # not routed (e.g. flash attention): project again
                    with torch.no_grad():
                        layer.remember_queries(attention.window_queries(hidden_states, position_embeddings,
                                                                        min(n, self.config.window_size)))
            return
        if position_embeddings is None:
            raise ValueError(f"SnapKVCache: {type(module).__name__} was called without position_embeddings")
        with torch.no_grad():
            q = layer.observation_queries(hidden_states, position_embeddings)
            pad = masked_prefix(attention_mask, hidden_states.shape[0], layer.visible_length() + n,
                                hidden_states.device)
        layer.expect_selection(PendingSelection(q, pad, max_capacity_prompt))

    # -- reporting
    @property
    def peak_prefill_bytes(self) -> int:
        """Most bytes held during prefill: every layer's buffers plus the full layer in flight."""
        return self.memory.peak

    def stats(self) -> dict:
        """Logical and physical lengths per layer (physical: the longest head's, under a per-head
        policy), entries kept per layer (over rows and KV heads), bytes held, and the KV reduction
        full / held (against what Transformers' DynamicCache for this model would hold: sliding
        layers at their window)."""
        layers = [lay for lay in self.layers if lay.held_entries() > 0]
        kv_bytes = sum(lay.nbytes() for lay in layers)
        full_bytes = sum(lay.entry_bytes() * lay.full_entries() for lay in layers)
        return {
            "logical_length": self.get_seq_length(),
            "physical_length": [lay.held_entries() for lay in self.layers],
            "sliding": [lay.is_sliding for lay in self.layers],
            "kept_entries": [lay.kept_entries() for lay in self.layers],
            "policy": getattr(self.config.policy, "name", type(self.config.policy).__name__),
            "scorer": getattr(self.config.scorer, "name", type(self.config.scorer).__name__),
            "store": stores.name(self.config.store),
            "kv_bytes": kv_bytes,
            "allocated_bytes": sum(lay.allocated_bytes() for lay in layers),
            "full_kv_bytes": full_bytes,
            "kv_reduction": full_bytes / kv_bytes if kv_bytes else 1.0,
            "compressions": [getattr(lay, "compressions", 0) for lay in self.layers],
            "peak_prefill_bytes": self.memory.peak,
        }

    def kept_positions(self, layer_idx: int) -> Optional[Tensor]:
        """Logical positions ``[B, H_kv, held]`` of the entries layer ``layer_idx`` holds (under a
        per-head policy ``held`` is the longest head's, the others padded with -1 at the end)."""
        return self.layers[layer_idx].positions

    def reset(self) -> None:
        super().reset()
        self.memory.peak = 0
