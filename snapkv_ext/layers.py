"""One layer's storage: a global layer in one of the stores (dense, ragged), or a sliding-window layer.

Each class has one job: :class:`_Schedule` says when a global layer selects and how many entries
it keeps, :class:`_Reports` derives what a layer reports, :class:`SnapKVLayer` (the dense store)
and :class:`RaggedSnapKVLayer` (the ragged one) hold what the selection keeps
(:mod:`snapkv_ext.selection` says what that is), :class:`SlidingWindowLayer` holds a window.

Layers depend one way: each gets what it needs at construction (the settings, its attention's
logit transform, the shared prefill-memory record) and never reaches into the cache that holds it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import policies, routing, selection
from .adapters import AttentionLayer
from .config import SnapKVConfig
from .selection import PendingSelection

try:
    from transformers.cache_utils import CacheLayerMixin
except ImportError as e:  # pragma: no cover - transformers is a declared dependency of the cache
    raise ImportError("snapkv_ext.layers needs transformers>=5.17: pip install 'transformers>=5.17,<6'") from e


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
    """What every layer kind shares: lazy initialisation (which refuses keys with another head count
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


class _Reports:
    """What a layer reports (``SnapKVCache.stats``, the benchmarks), derived from what each layer
    kind says of itself: ``kept_lengths()`` (entries per row and KV head, ``[B, H_kv]``, None while
    empty) and ``_geometry()`` ((B, H_kv, D, bytes per element), None while empty). Each kind also
    says ``held_entries()`` (its physical length), ``full_entries()`` (what an uncompressed cache
    would hold per KV head) and ``allocated_bytes()``."""

    def kept_entries(self) -> int:
        """Entries held over every row and KV head."""
        lengths = self.kept_lengths()
        return 0 if lengths is None else int(lengths.sum())

    def entry_bytes(self) -> int:
        """Bytes of one position over every row and KV head (keys and values)."""
        g = self._geometry()
        return 0 if g is None else 2 * g[0] * g[1] * g[2] * g[3]

    def nbytes(self) -> int:
        """Bytes of the entries held (keys and values)."""
        g = self._geometry()
        return 0 if g is None else 2 * self.kept_entries() * g[2] * g[3]


class _Schedule:
    """When a global layer selects, how many entries it keeps, and the queries of the window that
    selects: what the cache's pre-attention hook asks the layer (``selects``, ``wants_queries``,
    ``observation_queries``) and hands it (``remember_queries``, ``expect_selection``).

    Reads from the layer: ``config``, ``rank``/``num_global`` (its place among the global layers,
    which the policy's layer budgets index by), ``attention``, ``logical``, ``prompt_length`` and
    ``visible_length()``/``held_per_head()``."""

    def _begin_schedule(self) -> None:
        self._pending: Optional[PendingSelection] = None
        self._recent_q: Optional[Tensor] = None  # the last window_size queries seen (a decode budget's window)

    def selects(self, n: int) -> int:
        """The kept entries per KV head if appending ``n`` tokens selects, else 0. A first prefill
        selects when it exceeds the budget (otherwise the cache is exact); a later prefill (a new
        turn) re-selects when recompress is on, it is longer than the window, and the cache would
        exceed the budget."""
        cfg = self.config
        if self.prompt_length is not None:
            if self.logical + n < self.prompt_length:
                return 0
            cap = self.capacity_for(self.prompt_length)
            return cap if self.prompt_length > cap else 0
        if self.visible_length() == 0:
            cap = self.capacity_for(n)
            return cap if n > cap else 0
        if n > 1 and cfg.recompress and n > cfg.window_size:
            cap = self.capacity_for(self.logical + n)
            if self.visible_length() + n > cap:
                return cap
        if cfg.max_capacity_decode is not None:
            cap = self.decode_capacity()
            if self.held_per_head() + n > cap + cfg.decode_interval:
                return cap
        return 0

    def capacity_for(self, prompt_length: int) -> int:
        """Kept entries per KV head (on average over the heads) of this layer for a prompt of
        ``prompt_length`` tokens: the policy's share of the uniform budget."""
        cfg = self.config
        cap = cfg.max_capacity_prompt_for(prompt_length)
        caps = cfg.policy.layer_capacities(cap, cfg.window_size, self.num_global)
        return policies.check_capacities(cfg.policy, caps, cap, cfg.window_size, self.num_global)[self.rank]

    def decode_capacity(self) -> int:
        """Kept entries per KV head (on average over the heads) of this layer while generating:
        the policy's share of ``max_capacity_decode``."""
        cfg = self.config
        caps = cfg.policy.layer_capacities(cfg.max_capacity_decode, cfg.window_size, self.num_global)
        caps = policies.check_capacities(cfg.policy, caps, cfg.max_capacity_decode, cfg.window_size, self.num_global)
        return caps[self.rank]

    def wants_queries(self, n: int) -> bool:
        """Whether the hook should hand this forward's queries (:meth:`remember_queries`): with a decode
        budget, in the last ``window_size`` tokens before a re-selection (they are its window)."""
        cfg = self.config
        return (cfg.max_capacity_decode is not None and self.visible_length() > 0
                and self.held_per_head() + n > self.decode_capacity() + cfg.decode_interval - cfg.window_size)

    def remember_queries(self, q: Tensor) -> None:
        """Keep the last ``window_size`` post-RoPE queries ``[B, H_q, *, D]`` seen (a decode budget's window)."""
        w = self.config.window_size
        q = q.detach()
        if self._recent_q is not None and self._recent_q.shape[0] == q.shape[0]:
            q = torch.cat([self._recent_q.to(q.device), q], dim=2)
        self._recent_q = q[:, :, max(0, q.shape[2] - w):]

    def observation_queries(self, hidden_states: Tensor, position_embeddings) -> Tensor:
        """Queries ``[B, H_q, w, D]`` of the window that will select: the last ``window_size`` tokens',
        with a forward shorter than the window (a decode step) completed by the queries remembered
        before it (:meth:`remember_queries`; fewer when fewer were seen)."""
        w, n = self.config.window_size, hidden_states.shape[1]
        if n >= w or self._recent_q is None or self.visible_length() == 0:
            return self.attention.window_queries(hidden_states, position_embeddings, min(w, n))
        self.remember_queries(self.attention.window_queries(hidden_states, position_embeddings, n))
        return self._recent_q

    def expect_selection(self, pending: PendingSelection) -> None:
        self._pending = pending
        if self.config.max_capacity_decode is not None:  # the next re-selection's window starts from it
            self._recent_q = pending.q_window.detach()

    def _take_pending(self, n: int) -> Optional[PendingSelection]:
        pending, self._pending = self._pending, None
        if pending is None and self.selects(n):
            # The pre-attention hook did not run: the model is not the one the cache was made for.
            raise ValueError(f"this SnapKVCache was built for another model ({self._model_name}); create one per model")
        return pending

    def _map_queries(self, fn) -> None:
        if self._recent_q is not None:
            self._recent_q = fn(self._recent_q)


class SnapKVLayer(_Schedule, _Reports, _ReindexableLayer):
    """The ``dense`` store (:mod:`snapkv_ext.stores`): a global layer whose every KV head keeps the
    same number of entries, in a buffer ``[B, H_kv, allocated, D]`` holding ``physical`` entries
    whose logical positions are ``positions [B, H_kv, physical]``; ``logical`` tokens seen.

    Its job is the holding: write, append (amortised growth), keep a selection
    (:func:`snapkv_ext.selection.compress_into`, straight into a new buffer), reindex. When and
    how much to select is :class:`_Schedule`'s, what to keep is :mod:`snapkv_ext.selection`'s."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    # The store's capability (snapkv_ext.stores): every KV head of the layer at one length.
    per_head = False

    def __init__(self, config: SnapKVConfig, attention: AttentionLayer, memory: PrefillMemory, model_name: str,
                 rank: int = 0, num_global: int = 1):
        super().__init__()
        self.config = config
        self.rank, self.num_global = rank, num_global
        self.attention = attention
        self.layer_idx = attention.layer_idx
        self._memory = memory
        self._model_name = model_name
        self.physical = 0
        self.logical = 0
        self.compressions = 0
        self.positions: Optional[Tensor] = None
        self._kbuf = self._vbuf = self._pbuf = None
        self._begin_schedule()
        # Layer-major chunked prefill (snapkv_ext.prefill): the whole prompt's length while its
        # chunks arrive; the layer holds them all, and selects when the last one is in.
        self.prompt_length: Optional[int] = None

    def visible_length(self) -> int:
        """Entries the next forward attends to before its own tokens."""
        return self.physical

    def held_per_head(self) -> int:
        """Entries a KV head holds, on average over a row's heads (the most of any row): what a decode
        budget bounds (here every head holds the same)."""
        return self.visible_length()

    # -- the buffer
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
        """Make the selection from (k_all, v_all) the whole content: compressed straight into the
        new buffers (no temporary of the compressed size), with room for decode_reserve more."""
        n = min(k_all.shape[2], pending.max_capacity_prompt)
        self._allocate(k_all, n + self.config.reserve)
        kept = selection.compress_into(self.config, self.attention, pending, k_all, v_all, self._kbuf[:, :, :n],
                                       self._vbuf[:, :, :n])
        self._pbuf[:, :, :n].copy_(pos_all.gather(2, kept))
        self.physical = n
        self._views()
        self.compressions += 1

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

    def _map_buffers(self, fn) -> None:
        """Apply fn (a batch reindexing) to the key, value and position buffers (and remembered queries)."""
        self._map_queries(fn)
        if self.physical > 0:
            self._kbuf, self._vbuf, self._pbuf = fn(self._kbuf), fn(self._vbuf), fn(self._pbuf)
            self._views()

    # -- the Cache API
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

    def _select(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, pending: Optional[PendingSelection],
                logical: int) -> Tuple[Tensor, Tensor]:
        """Keep the selection from (k_all, v_all) (whose logical positions are pos_all), or all of
        it when nothing is pending; return the full KV for the current attention."""
        if pending is not None:
            self._store_selection(k_all, v_all, pos_all, pending)
        else:
            self._store(k_all, v_all, pos_all)
        self.logical = logical
        self._memory.record(k_all, v_all)
        return k_all, v_all

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
        self._begin_schedule()
        self.prompt_length = None
        self.is_initialized = False
        self.compressions = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SnapKVCache cannot be cropped: compressed entries cannot be restored")

    # -- reports (_Reports)
    def kept_lengths(self) -> Optional[Tensor]:
        """Entries each (batch row, KV head) holds: ``[B, H_kv]`` int64 (here all equal; None
        before the first update)."""
        return None if self.physical == 0 else torch.full(self.keys.shape[:2], self.physical, dtype=torch.int64)

    def _geometry(self):
        return None if self.physical == 0 else (*self.keys.shape[:2], self.keys.shape[3], self.keys.element_size())

    def held_entries(self) -> int:
        return self.physical

    def full_entries(self) -> int:
        """Entries per KV head an uncompressed cache would hold now."""
        return self.logical

    def allocated_bytes(self) -> int:
        return 0 if self._kbuf is None else 2 * self._kbuf.numel() * self._kbuf.element_size()


def _exclusive_cumsum(x: Tensor) -> Tensor:
    return torch.cumsum(x, 0) - x


def _segment_index(lengths: Tensor):
    """For segments of ``lengths [R]``: each entry's segment and its index in it (flat, in order)."""
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    inner = torch.arange(seg.numel(), device=lengths.device) - torch.repeat_interleave(_exclusive_cumsum(lengths), lengths)
    return seg, inner


def _rows(starts: Tensor, lengths: Tensor) -> Tensor:
    """Rows of segments ``(b, h)`` starting at ``starts`` of ``lengths`` (both ``[B, H]``), in order."""
    seg, inner = _segment_index(lengths.flatten())
    return starts.flatten()[seg] + inner


class _FlatStore:
    """The ragged store's packing: flat buffers ``k, v [rows, D]`` and ``p [rows]`` (positions)
    holding segment ``(b, h)`` at rows ``starts[b, h] ..`` ``+ lengths[b, h]``, with ``room`` free
    rows after each (the same for every segment). Built from entries ``k, v [N, D]``, ``p [N]``
    (segments in (b, h) order, ``lengths [B, H]``) with ``reserve`` free rows after each."""

    def __init__(self, k: Tensor, v: Tensor, p: Tensor, lengths: Tensor, reserve: int):
        caps = lengths + reserve
        self.starts = _exclusive_cumsum(caps.flatten()).view_as(lengths)
        total, D = int(caps.sum()), k.shape[-1]
        self.k = k.new_empty((total, D))
        self.v = torch.empty_like(self.k)
        self.p = p.new_empty((total,))
        rows = _rows(self.starts, lengths)
        self.k[rows], self.v[rows], self.p[rows] = k, v, p
        self.lengths = lengths.clone()
        # Host copies of what each decode step asks (the longest segment, the fullest row, the room
        # to append), kept exact by append: no device round trip per step, one per packing.
        self.len_max, self.row_max = (int(x) for x in torch.stack([lengths.max(), lengths.sum(1).max()]).tolist())
        self.room = reserve
        self.geometry = (lengths.shape[0], lengths.shape[1], D, k.element_size())

    def held(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The entries held ``k, v [N, D]``, ``p [N]``, segments in (b, h) order."""
        rows = _rows(self.starts, self.lengths)
        return self.k[rows], self.v[rows], self.p[rows]

    def reindexed(self, fn, reserve: int) -> "_FlatStore":
        """The store of the batch rows ``fn`` (a batch reindexing of ``[B, ...]`` tensors) picks."""
        starts, lengths = fn(self.starts), fn(self.lengths)
        rows = _rows(starts, lengths)
        return _FlatStore(self.k[rows], self.v[rows], self.p[rows], lengths, reserve)

    def append(self, k: Tensor, v: Tensor, first_position: int) -> None:
        """Entries ``k, v [B, H, n, D]`` after each segment, at positions ``first_position ..``
        (``room >= n``)."""
        B, H, n, D = k.shape
        dest = ((self.starts + self.lengths)[..., None] + torch.arange(n, device=self.starts.device)).flatten()
        self.k[dest] = k.reshape(-1, D)
        self.v[dest] = v.reshape(-1, D)
        self.p[dest] = torch.arange(first_position, first_position + n, device=self.p.device).repeat(B * H)
        self.lengths = self.lengths + n
        self.len_max, self.row_max, self.room = self.len_max + n, self.row_max + n * H, self.room - n

    def positions(self) -> Tensor:
        """``[B, H_kv, longest]`` positions of the entries held, padded with -1 after each segment."""
        B, H = self.lengths.shape
        seg, inner = _segment_index(self.lengths.flatten())
        out = torch.full((B * H, self.len_max), -1, dtype=torch.int64, device=self.p.device)
        out[seg, inner] = self.p[_rows(self.starts, self.lengths)]
        return out.view(B, H, -1)

    def left_padded(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each segment as a row of its own, left-padded to the longest: keys and values
        ``[B * H, 1, longest, D]`` (zeros), positions ``[B * H, 1, longest]`` (-1), padding ``[B * H]``."""
        B, H = self.lengths.shape
        n_max, D = self.len_max, self.k.shape[1]
        lengths = self.lengths.flatten()
        seg, inner = _segment_index(lengths)
        col = (n_max - lengths)[seg] + inner
        k, v, p = self.held()
        kd = self.k.new_zeros((B * H, 1, n_max, D))
        vd = torch.zeros_like(kd)
        pd = self.p.new_full((B * H, 1, n_max), -1)
        kd[seg, 0, col], vd[seg, 0, col], pd[seg, 0, col] = k, v, p
        return kd, vd, pd, n_max - lengths

    def allocated_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RaggedSnapKVLayer(SnapKVLayer):
    """The ``ragged`` store (:mod:`snapkv_ext.stores`; the one a per-head policy such as AdaKV needs):
    each (batch row, KV head) keeps its own number of entries, stored exactly. Until its first
    selection it is a dense :class:`SnapKVLayer` (a prompt within the budget decodes with the
    model's own attention); after, a :class:`_FlatStore` with ``decode_reserve`` free rows after
    each segment (amortised growth, like the dense buffer). Left padding is never stored. Decoding
    appends in place and attends through :func:`snapkv_ext.ops.ragged_attention`
    (:mod:`snapkv_ext.routing`)."""

    per_head = True  # the store holds each KV head at its own length (snapkv_ext.stores)

    def __init__(self, *args, **kwargs):
        self.flat: Optional[_FlatStore] = None
        self._dense_positions: Optional[Tensor] = None
        super().__init__(*args, **kwargs)

    @property
    def ragged(self) -> bool:
        return self.flat is not None

    # `positions` is the dense layer's attribute; ragged: [B, H_kv, longest] padded with -1
    @property
    def positions(self) -> Optional[Tensor]:
        return self.flat.positions() if self.ragged else self._dense_positions

    @positions.setter
    def positions(self, value) -> None:
        self._dense_positions = value

    def visible_length(self) -> int:
        return self.flat.len_max if self.ragged else self.physical

    def held_per_head(self) -> int:
        if not self.ragged:
            return self.physical
        H = self.flat.lengths.shape[1]
        return -(-self.flat.row_max // H)  # a head may hold more than its layer's mean

    def _pack(self, flat: _FlatStore) -> None:
        """Make ``flat`` the whole content (the dense buffers, if any, are dropped)."""
        self.flat = flat
        self._kbuf = self._vbuf = self._pbuf = self.keys = self.values = None
        self.physical = 0
        self._dense_positions = None

    def _store_kept(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, keep: Tensor) -> None:
        kept = (k_all[keep], v_all[keep], pos_all.expand(keep.shape)[keep])
        self._pack(_FlatStore(*kept, keep.sum(-1), self.config.reserve))

    def _store_selection(self, k_all: Tensor, v_all: Tensor, pos_all: Tensor, pending: PendingSelection) -> None:
        pad = pending.pad_lengths
        clamped = selection.clamp_padding(pad, k_all.shape[2], pending.q_window.shape[2])
        scores = selection.scores(self.config, self.attention, pending, k_all, v_all, clamped)
        self._store_kept(k_all, v_all, pos_all, selection.keep_mask(self.config, pending, scores, pad))
        self.compressions += 1

    def _reselect(self, pending: PendingSelection) -> None:
        """A new turn (already appended): select again over each head's entries, its segment left-
        padded to the longest for scoring (each (b, h) a row of its own)."""
        B, H = self.flat.lengths.shape
        kd, vd, pd, pad = self.flat.left_padded()
        n_max, D = kd.shape[2], kd.shape[3]
        q = pending.q_window
        w = q.shape[2]
        q = q.reshape(B, H, q.shape[1] // H, w, q.shape[3]).reshape(B * H, q.shape[1] // H, w, q.shape[3])
        # every segment holds the new turn's tokens, more than the window
        per_head = PendingSelection(q, pad, pending.max_capacity_prompt)
        scores = selection.scores(self.config, self.attention, per_head, kd, vd, pad)
        keep = selection.keep_mask(self.config, pending, scores.view(B, H, -1), pad.view(B, H))
        self._store_kept(kd.view(B, H, n_max, D), vd.view(B, H, n_max, D), pd.view(B, H, n_max), keep)
        self.compressions += 1

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        if not self.ragged or self.prompt_length is not None:
            return super().update(key_states, value_states, *args, **kwargs)
        flat = self.flat
        if key_states.shape[0] != flat.lengths.shape[0]:
            _check_batch(flat.lengths, key_states.shape[0])
        self.attention.check_kv_heads(key_states.shape[1])
        n = key_states.shape[2]
        pending = self._take_pending(n)
        if flat.room < n:  # grow: amortised, not one copy per token
            flat = _FlatStore(*flat.held(), flat.lengths, max(self.config.decode_reserve, flat.len_max // 4, n))
            self._pack(flat)
        flat.append(key_states, value_states, self.logical)
        self.logical += n
        routing.mark(flat.k, routing.RaggedKV(flat.starts, flat.lengths, n, flat.v, self.config.use_reference))
        if pending is not None:  # this forward attends over everything; the store keeps the selection
            self._reselect(pending)
            self._memory.record(flat.k[:0])
        return flat.k, flat.v

    def _map_buffers(self, fn) -> None:
        if not self.ragged:
            return super()._map_buffers(fn)
        self._map_queries(fn)
        self._pack(self.flat.reindexed(fn, self.config.decode_reserve))

    def reset(self) -> None:
        super().reset()
        self.flat = None

    # -- reports (_Reports)
    def kept_lengths(self) -> Optional[Tensor]:
        return self.flat.lengths.clone() if self.ragged else super().kept_lengths()

    def _geometry(self):
        return self.flat.geometry if self.ragged else super()._geometry()

    def held_entries(self) -> int:
        return self.visible_length()

    def allocated_bytes(self) -> int:
        return self.flat.allocated_bytes() if self.ragged else super().allocated_bytes()


class SlidingWindowLayer(_Reports, _ReindexableLayer):
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

    # -- reports (_Reports)
    def kept_lengths(self) -> Optional[Tensor]:
        """Entries each (batch row, KV head) holds: ``[B, H_kv]`` int64 (all equal), None while empty."""
        return None if self.keys is None else torch.full(self.keys.shape[:2], self.keys.shape[2], dtype=torch.int64)

    def _geometry(self):
        return None if self.keys is None else (*self.keys.shape[:2], self.keys.shape[3], self.keys.element_size())

    def held_entries(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def full_entries(self) -> int:
        """Entries per KV head Transformers' own sliding layer would hold now."""
        return self.held_entries()

    def allocated_bytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()
