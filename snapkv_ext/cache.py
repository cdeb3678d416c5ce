"""SnapKVCache: a drop-in Transformers cache that compresses the prompt's KV with SnapKV.

    cache = SnapKVCache(model, max_capacity_prompt=1024, window_size=32, kernel_size=7, pooling="max")
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)  # cache=cache from 5.24
    print(cache.stats())

How it plugs in (Transformers 5.x public Cache API, no monkeypatching):

- A forward pre-hook on each attention module (installed once per model, inert for any other
  cache) sees the module's input hidden states and rotary embeddings; when the coming
  ``update`` will compress, it recomputes the real queries of the last ``window_size`` tokens
  (the module's own ``q_proj``, any ``q_norm``, then RoPE) and hands them to *this cache*. No
  state lives on the model.
- ``update`` receives the layer's full keys/values, returns them for this forward's attention,
  and stores only the compressed ones: each layer is compressed right after its own prefill, so
  at most one layer's full KV exists at a time.
- The cache reports the *logical* length (positions of new tokens continue at L) from
  ``get_seq_length`` and the *physical* one through ``get_mask_sizes``, whose offset maps each
  physical slot onto the 2D attention mask. Compression keeps a left-padded row left-padded, so
  the mask stays right for every row.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - transformers is a declared dependency of the cache
    raise ImportError("snapkv_ext.cache needs transformers>=5.17: pip install 'transformers>=5.17,<6'") from e

SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
_POOLINGS = ("max", "avg")
_GROUP_REDUCE = ("mean", "max", "sum")


@dataclass(frozen=True)
class SnapKVConfig:
    """SnapKV settings, validated on construction.

    Exactly one budget: ``max_capacity_prompt`` (kept prompt entries per KV head, window
    included) or ``compression_ratio`` (fraction of each prompt kept, in (0, 1]).
    ``recompress``: when a later prefill (a new chat turn, a question) is longer than the window,
    re-select over everything cached plus the new tokens with the new tokens' own window, so the
    cache stays at the budget over turns. ``use_reference``: compress with the plain-torch
    reference (float64) instead of the native op, for debugging.
    """

    max_capacity_prompt: Optional[int] = 1024
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    group_reduce: str = "mean"
    compression_ratio: Optional[float] = None
    recompress: bool = True
    use_reference: bool = False
    decode_reserve: int = 128

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SnapKVConfig: {msg}")

        if not isinstance(self.window_size, int) or self.window_size < 1:
            bad(f"window_size must be a positive integer, got {self.window_size!r}")
        if self.compression_ratio is not None:
            if self.max_capacity_prompt is not None:
                bad("give either max_capacity_prompt or compression_ratio, not both "
                    f"(got {self.max_capacity_prompt!r} and {self.compression_ratio!r})")
            if not (isinstance(self.compression_ratio, (int, float)) and 0 < self.compression_ratio <= 1):
                bad(f"compression_ratio must be in (0, 1], got {self.compression_ratio!r}")
        else:
            if self.max_capacity_prompt is None:
                bad("give a budget: max_capacity_prompt (tokens) or compression_ratio (fraction kept)")
            if not isinstance(self.max_capacity_prompt, int) or self.max_capacity_prompt <= self.window_size:
                bad(f"max_capacity_prompt must be an integer larger than window_size ({self.window_size}), "
                    f"got {self.max_capacity_prompt!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            bad(f"kernel_size must be a positive odd integer, got {self.kernel_size!r}")
        if self.pooling not in _POOLINGS:
            bad(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if self.group_reduce not in _GROUP_REDUCE:
            bad(f"group_reduce must be one of {_GROUP_REDUCE}, got {self.group_reduce!r}")
        if not isinstance(self.decode_reserve, int) or self.decode_reserve < 0:
            bad(f"decode_reserve must be a non-negative integer, got {self.decode_reserve!r}")

    def budget(self, prompt_length: int) -> int:
        """Kept entries per KV head for a prompt of ``prompt_length`` tokens (window included)."""
        if self.compression_ratio is None:
            return self.max_capacity_prompt
        return max(self.window_size + 1, math.ceil(self.compression_ratio * prompt_length))


# ---------------------------------------------------------------- queries of the window


@functools.lru_cache(maxsize=None)
def _cache_argument(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> Dict[str, object]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``: the argument is ``cache``
    from Transformers 5.24 on (``past_key_values`` there is deprecated, removed in 5.40/6.0) and
    ``past_key_values`` before. ``model(ids, **cache_kwargs(model, cache))`` works on every 5.x."""
    return {_cache_argument(type(model)): cache}


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def window_queries(attn: torch.nn.Module, hidden_states: Tensor, position_embeddings, w: int) -> Tensor:
    """The real post-RoPE queries ``[B, H_q, w, D]`` of the last ``w`` tokens, computed exactly
    as the attention module computes its queries (q_proj, optional q_norm, rotary)."""
    hs = hidden_states[:, -w:]
    q = attn.q_proj(hs).view(hs.shape[0], hs.shape[1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    cos, sin = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin)


def _masked_prefix(attention_mask, B: int, kv_len: int, device) -> Optional[Tensor]:
    """Number of leading key positions each row's last query cannot see (its left padding),
    from whatever mask the attention module receives (2D, 4D bool or 4D additive), or None."""
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


def _attention_modules(model: torch.nn.Module) -> List[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    name = type(model).__name__
    if not mods:
        raise ValueError(f"SnapKVCache does not support {name}: no attention modules with q_proj and layer_idx found")
    for m in mods:
        cls = type(m).__name__
        if cls not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"SnapKVCache does not support {name} (attention class {cls}); supported attention classes: "
                f"{', '.join(SUPPORTED_ATTENTION)}"
            )
        mistral_window = cls == "MistralAttention" and getattr(m.config, "sliding_window", None) is not None
        if getattr(m, "sliding_window", None) is not None or mistral_window:
            raise ValueError(f"SnapKVCache does not support sliding-window attention layers ({name}, {cls}, layer {m.layer_idx})")
    return sorted(mods, key=lambda m: m.layer_idx)


# ---------------------------------------------------------------- one layer


class SnapKVLayer(CacheLayerMixin):
    """One layer's cache: a buffer ``[B, H_kv, capacity, D]`` holding ``physical`` entries whose
    logical positions are ``positions [B, H_kv, physical]``; ``logical`` tokens seen."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "SnapKVCache", layer_idx: int):
        super().__init__()
        self._cache = cache
        self.layer_idx = layer_idx
        self.physical = 0
        self.logical = 0
        self.positions: Optional[Tensor] = None
        self._kbuf: Optional[Tensor] = None
        self._vbuf: Optional[Tensor] = None
        self._pbuf: Optional[Tensor] = None
        self.compressions = 0
        # A document's full KV kept outside the working cache (SnapKVDocument): attended to and
        # selected from by the next prefill, then dropped from this layer.
        self.backing: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    def attach_document(self, keys: Tensor, values: Tensor, q_tail: Tensor) -> None:
        """Back this empty layer with a document's full KV ``[1, H_kv, L, D]`` (any device) and
        the post-RoPE queries of its last tokens ``[1, H_q, w, D]``."""
        self.reset()
        self.backing = (keys, values, q_tail)
        self.logical = keys.shape[2]

    def visible_length(self) -> int:
        """Entries the next forward attends to before its own tokens."""
        return self.physical + (self.backing[0].shape[2] if self.backing is not None else 0)

    # -- storage
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _allocate(self, like: Tensor, n: int) -> None:
        """Fresh, empty buffers for n entries shaped like `like` [B, H_kv, *, D]."""
        B, H, _, D = like.shape
        self._kbuf = torch.empty((B, H, n, D), dtype=like.dtype, device=like.device)
        self._vbuf = torch.empty_like(self._kbuf)
        self._pbuf = torch.empty((B, H, n), dtype=torch.int64, device=like.device)
        self.physical = 0

    def _store(self, k: Tensor, v: Tensor, positions: Tensor, reserve: int) -> None:
        """Make (k, v) the whole content, in a buffer with room for `reserve` more entries."""
        self._allocate(k, k.shape[2] + reserve)
        self._write(k, v, positions)

    def _store_selection(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, pending, reserve: int) -> None:
        """Make SnapKV's selection from (k_all, v_all) the whole content: compressed straight
        into the new buffers (no temporary of the compressed size), with room for `reserve` more."""
        q_window, pad, budget = pending
        n = min(k_all.shape[2], budget)
        self._allocate(k_all, n + reserve)
        phys = self._cache._compress_into(q_window, k_all, v_all, budget, pad, self._kbuf[:, :, :n], self._vbuf[:, :, :n])
        self._pbuf[:, :, :n].copy_(pos_all.gather(2, phys))
        self.physical = n
        self._views()

    def _views(self) -> None:
        self.keys = self._kbuf[:, :, : self.physical]
        self.values = self._vbuf[:, :, : self.physical]
        self.positions = self._pbuf[:, :, : self.physical]

    def _write(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Write entries after the held ones, in place (the buffers have room)."""
        end = self.physical + k.shape[2]
        self._kbuf[:, :, self.physical : end].copy_(k)
        self._vbuf[:, :, self.physical : end].copy_(v)
        self._pbuf[:, :, self.physical : end].copy_(positions)
        self.physical = end
        self._views()

    def _map_buffers(self, fn) -> None:
        """Apply fn (a batch reindexing) to the key, value and position buffers."""
        if self.physical > 0:
            self._kbuf, self._vbuf, self._pbuf = fn(self._kbuf), fn(self._vbuf), fn(self._pbuf)
            self._views()

    def _append(self, k: Tensor, v: Tensor) -> None:
        n = k.shape[2]
        if self.physical + n > self._kbuf.shape[2]:  # grow: amortised, not one copy per token
            cap = self.physical + n + max(self._cache.config.decode_reserve, self.physical // 4)
            old = (self.keys, self.values, self.positions)
            self._kbuf = self._kbuf.new_empty((*k.shape[:2], cap, k.shape[3]))
            self._vbuf = torch.empty_like(self._kbuf)
            self._pbuf = self._pbuf.new_empty((*k.shape[:2], cap))
            self.physical = 0
            self._write(*old)
        new_pos = torch.arange(self.logical, self.logical + n, device=k.device).expand(k.shape[0], k.shape[1], n)
        self._write(k, v, new_pos)

    # -- the Cache API
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        cache = self._cache
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, n, _ = key_states.shape
        if self.physical > 0 and self._kbuf.shape[0] != B:
            raise ValueError(
                f"SnapKVCache: the batch size changed from {self._kbuf.shape[0]} to {B}; "
                "use a new cache (or cache.reset()) for a new batch"
            )
        pending = cache._pending.pop(self.layer_idx, None)
        if pending is None and cache._should_compress(self, n):
            # The pre-attention hook did not run: the model is not the one the cache was made for.
            raise ValueError(
                f"this SnapKVCache was built for another model ({cache._model_name}); create one per model"
            )
        if self.backing is not None:
            return self._update_from_document(key_states, value_states, pending)
        if self.physical == 0:
            positions = torch.arange(n, device=key_states.device).expand(B, H, n)
            return self._select(key_states, value_states, positions, pending, n)
        if pending is not None:
            # A new turn longer than the window: re-select over what is cached plus the new
            # tokens, with the new tokens' own window.
            k_all = torch.cat([self.keys, key_states], dim=2)
            v_all = torch.cat([self.values, value_states], dim=2)
            pos_all = torch.cat(
                [self.positions, torch.arange(self.logical, self.logical + n, device=key_states.device).expand(B, H, n)],
                dim=2,
            )
            return self._select(k_all, v_all, pos_all, pending, self.logical + n)
        self._append(key_states, value_states)
        self.logical += n
        return self.keys, self.values

    def _update_from_document(self, key_states: Tensor, value_states: Tensor, pending) -> Tuple[Tensor, Tensor]:
        """First prefill after a document: attend to the document's full KV (brought in for this
        layer only) plus the new tokens, then keep what SnapKV selects over both."""
        B = key_states.shape[0]
        H = key_states.shape[1]
        if B != 1:
            raise ValueError("a document-backed SnapKVCache takes one question at a time "
                             "(SnapKVDocument.generate batches several)")
        dk, dv, _ = self.backing
        dev = key_states.device
        k_all = torch.cat([dk.to(dev, non_blocking=True), key_states], dim=2)
        v_all = torch.cat([dv.to(dev, non_blocking=True), value_states], dim=2)
        total = k_all.shape[2]
        self.backing = None
        return self._select(k_all, v_all, torch.arange(total, device=dev).expand(B, H, total), pending, total)

    def _select(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, pending, logical: int) -> Tuple[Tensor, Tensor]:
        """Keep SnapKV's selection from (k_all, v_all) (whose logical positions are pos_all), or
        all of it when nothing is pending; return the full KV for the current attention."""
        cache = self._cache
        if pending is not None:
            self._store_selection(k_all, v_all, pos_all, pending, cache.config.decode_reserve)
            self.compressions += 1
        else:
            self._store(k_all, v_all, pos_all, cache.config.decode_reserve)
        self.logical = logical
        cache._track_prefill(self, k_all, v_all)
        return k_all, v_all

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        # Physical slot p sits at 2D-mask (logical) index p + offset: compression keeps the
        # newest prompt entries at the end and a padded row's padding at the front.
        visible = self.visible_length()
        return visible + query_length, self.logical - visible

    def get_seq_length(self) -> int:
        return self.logical

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.physical = self.logical = 0
        self.backing = None
        self.positions = self._kbuf = self._vbuf = self._pbuf = self.keys = self.values = None
        self.is_initialized = False
        self.compressions = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.physical > 0:
            idx = beam_idx.to(self._kbuf.device)
            self._map_buffers(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_buffers(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SnapKVCache cannot be cropped: compressed entries cannot be restored")

    def nbytes(self) -> int:
        """Bytes of the entries held (keys and values)."""
        if self.physical == 0:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()

    def allocated_bytes(self) -> int:
        if self._kbuf is None:
            return 0
        return 2 * self._kbuf.numel() * self._kbuf.element_size()


# ---------------------------------------------------------------- the cache


class SnapKVCache(Cache):
    """A Transformers cache that keeps, per layer and KV head, the prompt entries SnapKV selects.

    Parameters
    ----------
    model : PreTrainedModel
        The model the cache will be used with (Llama, Mistral, Qwen2, Qwen3 attention, e.g.
        SmolLM2). Its attention modules get an inert forward pre-hook (once).
    max_capacity_prompt, window_size, kernel_size, pooling, group_reduce, compression_ratio,
    recompress, use_reference, decode_reserve :
        See :class:`SnapKVConfig`; or pass ``config=SnapKVConfig(...)``.
    """

    def __init__(self, model, max_capacity_prompt: Optional[int] = None, window_size: int = 32,
                 kernel_size: int = 7, pooling: str = "max", *, config: Optional[SnapKVConfig] = None,
                 compression_ratio: Optional[float] = None, group_reduce: str = "mean", recompress: bool = True,
                 use_reference: bool = False, decode_reserve: int = 128):
        if config is None:
            if max_capacity_prompt is None and compression_ratio is None:
                max_capacity_prompt = 1024
            config = SnapKVConfig(max_capacity_prompt=max_capacity_prompt, window_size=window_size,
                                  kernel_size=kernel_size, pooling=pooling, group_reduce=group_reduce,
                                  compression_ratio=compression_ratio, recompress=recompress,
                                  use_reference=use_reference, decode_reserve=decode_reserve)
        elif not isinstance(config, SnapKVConfig):
            raise ValueError(f"config must be a SnapKVConfig, got {type(config).__name__}")
        self.config = config
        modules = _attention_modules(model)
        self._module_ids = {id(m) for m in modules}
        self._model_name = type(model).__name__
        for m in modules:
            if not getattr(m, "_snapkv_hooked", False):
                m.register_forward_pre_hook(_pre_attention_hook, with_kwargs=True)
                m._snapkv_hooked = True
        self._pending: Dict[int, Tuple[Tensor, Optional[Tensor], int]] = {}
        self.peak_prefill_bytes = 0
        super().__init__(layers=[SnapKVLayer(self, i) for i in range(len(modules))])

    # -- called by the hook, right before a layer's attention
    def _before_attention(self, module, hidden_states: Tensor, position_embeddings, attention_mask) -> None:
        if id(module) not in self._module_ids:
            raise ValueError(
                f"this SnapKVCache was built for another model ({self._model_name}); create one per model"
            )
        layer = self.layers[module.layer_idx]
        n = hidden_states.shape[1]
        budget = self._should_compress(layer, n)
        if not budget:
            return
        w = self.config.window_size
        if position_embeddings is None:
            raise ValueError(f"SnapKVCache: {type(module).__name__} was called without position_embeddings")
        with torch.no_grad():
            if layer.backing is not None and n < w:
                # A question shorter than the window: the window reaches into the document,
                # whose last queries were kept when it was read.
                q_tail = layer.backing[2].to(hidden_states.device)
                q = torch.cat([q_tail[:, :, q_tail.shape[2] - (w - n):],
                               window_queries(module, hidden_states, position_embeddings, n)], dim=2)
            else:
                q = window_queries(module, hidden_states, position_embeddings, w)
            pad = _masked_prefix(attention_mask, hidden_states.shape[0], layer.visible_length() + n,
                                 hidden_states.device)
        self._pending[module.layer_idx] = (q, pad, budget)

    def _should_compress(self, layer: SnapKVLayer, n: int) -> int:
        """The budget if appending `n` tokens to `layer` compresses, else 0. A first prefill
        compresses when it exceeds the budget (otherwise the cache is exact); a later prefill
        (a new turn) re-selects when recompress is on, it is longer than the window, and the
        cache would exceed the budget."""
        cfg = self.config
        if layer.backing is not None:
            total = layer.logical + n
            budget = cfg.budget(total)
            return budget if total > budget else 0
        if layer.physical == 0:
            budget = cfg.budget(n)
            return budget if n > budget else 0
        if n == 1 or not cfg.recompress or n <= cfg.window_size:
            return 0
        budget = cfg.budget(layer.logical + n)
        return budget if layer.physical + n > budget else 0

    def _compress_into(self, q_window: Tensor, keys: Tensor, values: Tensor, budget: int, pad: Optional[Tensor],
                       keys_out: Tensor, values_out: Tensor) -> Tensor:
        """SnapKV over (keys, values) written into keys_out/values_out; -> the kept indices."""
        cfg = self.config
        L, w = keys.shape[2], q_window.shape[2]
        if pad is not None:
            # A row shorter than the window keeps all it has; its window covers padding too.
            pad = pad.clamp(max=L - w)
            if not bool((pad > 0).any()):
                pad = None
        q_window = q_window.to(keys.dtype)
        fn = reference.snapkv_compress_into if cfg.use_reference else ops.snapkv_compress_into
        return fn(q_window, keys, values, budget, keys_out, values_out, cfg.kernel_size, cfg.pooling,
                  cfg.group_reduce, pad)

    def _track_prefill(self, layer: SnapKVLayer, key_states: Tensor, value_states: Tensor) -> None:
        full = 2 * key_states.numel() * key_states.element_size()
        held = sum(lay.allocated_bytes() for lay in self.layers)
        self.peak_prefill_bytes = max(self.peak_prefill_bytes, held + full)

    # -- reporting
    def stats(self) -> dict:
        """Logical and physical lengths per layer, bytes held, and the compression ratio."""
        layers = [lay for lay in self.layers if lay.physical > 0]
        logical = self.get_seq_length()
        physical = [lay.physical for lay in self.layers]
        kv_bytes = sum(lay.nbytes() for lay in layers)
        full_bytes = sum(2 * lay.keys.shape[0] * lay.keys.shape[1] * lay.logical * lay.keys.shape[3]
                         * lay.keys.element_size() for lay in layers)
        return {
            "logical_length": logical,
            "physical_length": physical,
            "kv_bytes": kv_bytes,
            "allocated_bytes": sum(lay.allocated_bytes() for lay in layers),
            "full_kv_bytes": full_bytes,
            "compression_ratio": full_bytes / kv_bytes if kv_bytes else 1.0,
            "compressions": [lay.compressions for lay in self.layers],
            "peak_prefill_bytes": self.peak_prefill_bytes,
        }

    def kept_positions(self, layer_idx: int) -> Optional[Tensor]:
        """Logical positions ``[B, H_kv, physical]`` of the entries layer ``layer_idx`` holds."""
        return self.layers[layer_idx].positions

    def reset(self) -> None:
        super().reset()
        self._pending.clear()
        self.peak_prefill_bytes = 0
