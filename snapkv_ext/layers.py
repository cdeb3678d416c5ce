"""One layer's storage: a SnapKV-compressed global layer, or a sliding-window layer.

Layers depend one way: each gets what it needs at construction (the settings, its attention's
logit transform, the shared prefill-memory record) and never reaches into the cache that holds it.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from .adapters import AttentionLayer
from .config import SnapKVConfig

try:
    from transformers.cache_utils import CacheLayerMixin
except ImportError as e:  # pragma: no cover - transformers is a declared dependency of the cache
    raise ImportError("snapkv_ext.layers needs transformers>=5.17: pip install 'transformers>=5.17,<6'") from e


class PendingSelection(NamedTuple):
    """What the pre-attention hook hands a layer right before the ``update`` that selects."""

    q_window: Tensor  # [B, H_q, w, D] post-RoPE queries of the observation window
    pad_lengths: Optional[Tensor]  # [B] int64 left padding of each row, or None
    max_capacity_prompt: int  # kept entries per KV head, window included


class PrefillMemory:
    """Peak bytes during prefill: what every layer holds plus the one full layer in flight."""

    def __init__(self):
        self.layers: List[CacheLayerMixin] = []
        self.peak = 0

    def record(self, in_flight: Tensor, *more: Tensor) -> None:
        full = sum(t.numel() * t.element_size() for t in (in_flight, *more))
        held = sum(layer.allocated_bytes() for layer in self.layers)
        self.peak = max(self.peak, held + full)


def _check_batch(held: Optional[Tensor], B: int) -> None:
    if held is not None and held.shape[0] != B:
        raise ValueError(f"SnapKVCache: the batch size changed from {held.shape[0]} to {B}; "
                         "use a new cache (or cache.reset()) for a new batch")


class _ReindexableLayer(CacheLayerMixin):
    """What both layer kinds share: lazy initialisation (which refuses keys with another head count
    than the layer's attention computes on this process), and the batch reindexing generate() asks
    for (beam search, repeated rows, dropped rows) through the subclass's _map_buffers."""

    attention: Optional[AttentionLayer] = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if self.attention is not None:
            self.attention.check_kv_heads(key_states.shape[1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _map_buffers(self, fn) -> None:  # pragma: no cover - every layer kind defines it
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_buffers(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_buffers(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_buffers(lambda t: t[indices])


class SnapKVLayer(_ReindexableLayer):
    """A global layer compressed by SnapKV: a buffer ``[B, H_kv, allocated, D]`` holding ``physical``
    entries whose logical positions are ``positions [B, H_kv, physical]``; ``logical`` tokens seen."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, config: SnapKVConfig, attention: AttentionLayer, memory: PrefillMemory, model_name: str):
        super().__init__()
        self.config = config
        self.attention = attention
        self.layer_idx = attention.layer_idx
        self._memory = memory
        self._model_name = model_name
        self.physical = 0
        self.logical = 0
        self.compressions = 0
        self.positions: Optional[Tensor] = None
        self._kbuf = self._vbuf = self._pbuf = None
        self._pending: Optional[PendingSelection] = None
        # Layer-major chunked prefill (snapkv_ext.prefill): the whole prompt's length while its
        # chunks arrive; the layer holds them all, and selects when the last one is in.
        self.prompt_length: Optional[int] = None

    # -- what the pre-attention hook asks and gives
    def selects(self, n: int) -> int:
        """The kept entries per KV head if appending ``n`` tokens selects, else 0. A first prefill
        selects when it exceeds the budget (otherwise the cache is exact); a later prefill (a new
        turn) re-selects when recompress is on, it is longer than the window, and the cache would
        exceed the budget."""
        cfg = self.config
        if self.prompt_length is not None:
            if self.logical + n < self.prompt_length:
                return 0
            cap = cfg.max_capacity_prompt_for(self.prompt_length)
            return cap if self.prompt_length > cap else 0
        if self.physical == 0:
            cap = cfg.max_capacity_prompt_for(n)
            return cap if n > cap else 0
        if n == 1 or not cfg.recompress or n <= cfg.window_size:
            return 0
        cap = cfg.max_capacity_prompt_for(self.logical + n)
        return cap if self.physical + n > cap else 0

    def observation_queries(self, hidden_states: Tensor, position_embeddings) -> Tensor:
        """Queries ``[B, H_q, w, D]`` of the window that will select."""
        return self.attention.window_queries(hidden_states, position_embeddings, self.config.window_size)

    def expect_selection(self, pending: PendingSelection) -> None:
        self._pending = pending

    def visible_length(self) -> int:
        """Entries the next forward attends to before its own tokens."""
        return self.physical

    # -- storage
    def _allocate(self, like: Tensor, n: int) -> None:
        """Fresh, empty buffers for n entries shaped like `like` [B, H_kv, *, D]."""
        B, H, _, D = like.shape
        self._kbuf = torch.empty((B, H, n, D), dtype=like.dtype, device=like.device)
        self._vbuf = torch.empty_like(self._kbuf)
        self._pbuf = torch.empty((B, H, n), dtype=torch.int64, device=like.device)
        self.physical = 0

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

    def _store(self, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Make (k, v) the whole content, with room for decode_reserve more entries."""
        self._allocate(k, k.shape[2] + self.config.decode_reserve)
        self._write(k, v, positions)

    def _store_selection(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, pending: PendingSelection) -> None:
        """Make SnapKV's selection from (k_all, v_all) the whole content: compressed straight into
        the new buffers (no temporary of the compressed size), with room for decode_reserve more."""
        n = min(k_all.shape[2], pending.max_capacity_prompt)
        self._allocate(k_all, n + self.config.decode_reserve)
        kept = self._compress_into(pending, k_all, v_all, self._kbuf[:, :, :n], self._vbuf[:, :, :n])
        self._pbuf[:, :, :n].copy_(pos_all.gather(2, kept))
        self.physical = n
        self._views()
        self.compressions += 1

    def _compress_into(self, pending: PendingSelection, keys: Tensor, values: Tensor, keys_out: Tensor,
                       values_out: Tensor) -> Tensor:
        """SnapKV over (keys, values) with this attention's own logit transform, written into the
        outputs; -> the kept indices [B, H_kv, C]."""
        cfg, att = self.config, self.attention
        L, w = keys.shape[2], pending.q_window.shape[2]
        pad = pending.pad_lengths
        if pad is not None:
            # A row shorter than the window keeps all it has; its window covers padding too.
            pad = pad.clamp(max=L - w)
            if not bool((pad > 0).any()):
                pad = None
        fn = reference.snapkv_compress_into if cfg.use_reference else ops.snapkv_compress_into
        return fn(pending.q_window.to(keys.dtype), keys, values, pending.max_capacity_prompt, keys_out, values_out,
                  cfg.kernel_size, cfg.pooling, cfg.group_reduce, pad, scale=att.scale, softcap=att.softcap)

    def _map_buffers(self, fn) -> None:
        """Apply fn (a batch reindexing) to the key, value and position buffers."""
        if self.physical > 0:
            self._kbuf, self._vbuf, self._pbuf = fn(self._kbuf), fn(self._vbuf), fn(self._pbuf)
            self._views()

    def _append(self, k: Tensor, v: Tensor) -> None:
        n = k.shape[2]
        if self.physical + n > self._kbuf.shape[2]:  # grow: amortised, not one copy per token
            cap = self.physical + n + max(self.config.decode_reserve, self.physical // 4)
            old = (self.keys, self.values, self.positions)
            self._kbuf = self._kbuf.new_empty((*k.shape[:2], cap, k.shape[3]))
            self._vbuf = torch.empty_like(self._kbuf)
            self._pbuf = self._pbuf.new_empty((*k.shape[:2], cap))
            self.physical = 0
            self._write(*old)
        self._write(k, v, self._new_positions(k))

    def _new_positions(self, k: Tensor) -> Tensor:
        B, H, n, _ = k.shape
        return torch.arange(self.logical, self.logical + n, device=k.device).expand(B, H, n)

    # -- the Cache API
    def _take_pending(self, n: int) -> Optional[PendingSelection]:
        pending, self._pending = self._pending, None
        if pending is None and self.selects(n):
            # The pre-attention hook did not run: the model is not the one the cache was made for.
            raise ValueError(f"this SnapKVCache was built for another model ({self._model_name}); create one per model")
        return pending

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        _check_batch(self._kbuf if self.physical > 0 else None, key_states.shape[0])
        pending = self._take_pending(n)
        if self.prompt_length is not None:
            return self._update_chunk(key_states, value_states, pending)
        if self.physical == 0:
            return self._select(key_states, value_states, self._new_positions(key_states), pending, n)
        if pending is not None:
            # A new turn longer than the window: re-select over what is cached plus the new
            # tokens, with the new tokens' own window.
            k_all = torch.cat([self.keys, key_states], dim=2)
            v_all = torch.cat([self.values, value_states], dim=2)
            pos_all = torch.cat([self.positions, self._new_positions(key_states)], dim=2)
            return self._select(k_all, v_all, pos_all, pending, self.logical + n)
        self._append(key_states, value_states)
        self.logical += n
        return self.keys, self.values

    def begin_chunks(self, prompt_length: int) -> None:
        """Expect a ``prompt_length``-token prompt in chunks (layer-major prefill): hold every chunk
        in one buffer of the prompt's size, and select over all of it, with the last chunk's
        window, when the last chunk arrives: exactly what one update with the whole prompt keeps."""
        if self.logical:
            raise ValueError("chunked prefill needs an empty cache (cache.reset() first)")
        self.prompt_length = prompt_length

    def _update_chunk(self, k: Tensor, v: Tensor, pending: Optional[PendingSelection]) -> Tuple[Tensor, Tensor]:
        total, n = self.prompt_length, k.shape[2]
        if self.logical + n > total:
            raise ValueError(f"chunked prefill: {self.logical + n} tokens arrived for a {total}-token prompt")
        if self.logical == 0:
            self._allocate(k, total + self.config.decode_reserve)
        self._write(k, v, self._new_positions(k))
        self.logical += n
        k_all, v_all = self.keys, self.values
        if self.logical == total:
            self.prompt_length = None
            if pending is not None:  # the full buffer is freed once this chunk's attention is done
                full = (self._kbuf, self._vbuf)
                self._store_selection(k_all, v_all, self.positions, pending)
                self._memory.record(*full)
                return k_all, v_all
        self._memory.record(k_all[:, :, :0])  # the held buffer is the whole layer: counted as held
        return k_all, v_all

    def _select(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, pending: Optional[PendingSelection],
                logical: int) -> Tuple[Tensor, Tensor]:
        """Keep SnapKV's selection from (k_all, v_all) (whose logical positions are pos_all), or
        all of it when nothing is pending; return the full KV for the current attention."""
        if pending is not None:
            self._store_selection(k_all, v_all, pos_all, pending)
        else:
            self._store(k_all, v_all, pos_all)
        self.logical = logical
        self._memory.record(k_all, v_all)
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
        self.positions = self._kbuf = self._vbuf = self._pbuf = self.keys = self.values = None
        self._pending = None
        self.prompt_length = None
        self.is_initialized = False
        self.compressions = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SnapKVCache cannot be cropped: compressed entries cannot be restored")

    def held_entries(self) -> int:
        return self.physical

    def full_entries(self) -> int:
        """Entries per KV head an uncompressed cache would hold now."""
        return self.logical

    def nbytes(self) -> int:
        """Bytes of the entries held (keys and values)."""
        return 0 if self.physical == 0 else 2 * self.keys.numel() * self.keys.element_size()

    def allocated_bytes(self) -> int:
        return 0 if self._kbuf is None else 2 * self._kbuf.numel() * self._kbuf.element_size()


class SlidingWindowLayer(_ReindexableLayer):
    """A sliding-window layer: keeps exactly the last ``sliding_window - 1`` entries, all the next
    token can see, as Transformers' own sliding layers do; never compressed, never more."""

    is_compileable = False
    is_sliding = True
    is_croppable = False

    def __init__(self, layer_idx: int, sliding_window: int, memory: PrefillMemory,
                 attention: Optional[AttentionLayer] = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self._memory = memory
        self.attention = attention
        self.logical = 0
        self.keys = self.values = None

    def preload(self, keys: Tensor, values: Tensor, logical: int) -> None:
        """Start from the last entries ``[B, H_kv, <= sliding_window - 1, D]`` of a ``logical``-token
        prefix read elsewhere (a document), on any device: they move to the layer's own device
        (where its attention runs) at the first update."""
        self.reset()
        self.lazy_initialization(keys, values)
        keep = min(keys.shape[2], self.sliding_window - 1)
        self.keys, self.values = keys[:, :, keys.shape[2] - keep:], values[:, :, values.shape[2] - keep:]
        self.logical = logical

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _check_batch(self.keys, key_states.shape[0])
        if self.keys is not None and self.keys.device != key_states.device:  # preloaded elsewhere
            self.keys, self.values = self.keys.to(key_states.device), self.values.to(key_states.device)
            self.device = key_states.device
        if self.keys is None:
            full_k, full_v, fresh = key_states, value_states, False
        else:
            full_k = torch.cat([self.keys, key_states], dim=2)
            full_v = torch.cat([self.values, value_states], dim=2)
            fresh = True
        self.logical += key_states.shape[2]
        keep = min(full_k.shape[2], self.sliding_window - 1)
        tail_k, tail_v = full_k[:, :, full_k.shape[2] - keep:], full_v[:, :, full_v.shape[2] - keep:]
        if not fresh or full_k.shape[2] > self.sliding_window:
            # A view of a longer (or the model's own) tensor would keep all of it alive.
            tail_k, tail_v = tail_k.clone(), tail_v.clone()
        self.keys, self.values = tail_k, tail_v
        self._memory.record(full_k, full_v)
        return full_k, full_v

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        held = 0 if self.keys is None else self.keys.shape[2]
        return held + query_length, self.logical - held

    def get_seq_length(self) -> int:
        return self.logical

    def get_max_length(self) -> int:
        return self.sliding_window

    @property
    def positions(self) -> Optional[Tensor]:
        """Logical positions ``[B, H_kv, held]`` of the entries held."""
        if self.keys is None:
            return None
        B, H, held, _ = self.keys.shape
        return torch.arange(self.logical - held, self.logical, device=self.keys.device).expand(B, H, held)

    def reset(self) -> None:
        self.logical = 0
        self.keys = self.values = None
        self.is_initialized = False

    def _map_buffers(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SnapKVCache cannot be cropped: a sliding layer no longer holds what it slid past")

    def held_entries(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def full_entries(self) -> int:
        """Entries per KV head Transformers' own sliding layer would hold now."""
        return self.held_entries()

    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()
