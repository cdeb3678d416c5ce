"""Layer-major chunked prefill: exact SnapKV at any prompt length, memory bounded by one layer.

    cache = SnapKVCache(model, max_capacity_prompt=4096)
    logits = prefill(model, input_ids, cache, chunk_size=4096)       # [B, vocab], the next token's
    first = logits.argmax(-1, keepdim=True)
    out = model.generate(torch.cat([input_ids, first], 1), **cache_kwargs(model, cache), max_new_tokens=255)

``model.generate`` prefills the whole prompt in one forward: every layer materialises activations
for all L tokens. Compressing chunk by chunk as they arrive would bound that, but would change the
method (early chunks pruned before the question at the end is seen). Here the prompt runs *layer
by layer*: the hidden states of all L tokens are kept (``[B, L, hidden]``); layer l runs them
through in chunks, each chunk attending to the layer's keys so far (the model's own attention,
causal at the chunk's offset); when the layer has seen all L tokens it selects with the real
queries of the last ``window_size`` tokens, exactly as from scratch, and frees its full KV; then
layer l + 1. Peak memory = weights + hidden states + one layer's full KV + one chunk's activations
+ the compressed cache (:func:`prefill_memory`).

Each chunk goes through the model's own ``forward`` (its embedding, rotary embedding, masks,
logit scaling and soft-cap: one code path for every family in :mod:`snapkv_ext.adapters`), with
the decoder layers other than l passed through for that call (the list entries are swapped for
the call and put back, also on error). The cache answers the model's questions about lengths and
mask sizes for layer l while it runs (``SnapKVCache.focus``).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import routing
from .adapters import attention_layers, decoder_layers
from .cache import LayerMajorCache, SnapKVCache, cache_kwargs
from .layers import SnapKVLayer

DEFAULT_CHUNK_SIZE = 4096


class _Skip(torch.nn.Module):
    """A decoder layer that passes its input through (the layers not being run)."""

    def __init__(self, like: torch.nn.Module):
        super().__init__()
        if hasattr(like, "attention_type"):  # some models pick each layer's mask by it
            self.attention_type = like.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Run(torch.nn.Module):
    """Runs decoder layer ``layer`` on the stored hidden states of the current chunk (layer 0: on
    the embedding the model passes in) and writes its output back over them."""

    def __init__(self, layer: torch.nn.Module, index: int, state: "_Hidden"):
        super().__init__()
        self._layer = (layer,)  # not registered: the real layer stays where it is in the model
        self.index, self.state = index, state
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        x = hidden_states if self.index == 0 else self.state.read(hidden_states.device)
        out = self._layer[0](x, *args, **kwargs)
        self.state.write(out[0] if isinstance(out, tuple) else out)
        return out


class _Hidden:
    """The hidden states of all L tokens, ``[B, L, hidden]``, on ``device`` (None: where layer 0
    runs; "cpu" with the model on a GPU: pinned, streamed per chunk)."""

    def __init__(self, B: int, L: int, device):
        self.B, self.L, self.device = B, L, device
        self.buf: Optional[Tensor] = None
        self.span = (0, 0)

    def read(self, device) -> Tensor:
        s, e = self.span
        return self.buf[:, s:e].to(device, non_blocking=True)

    def write(self, out: Tensor) -> None:
        s, e = self.span
        if self.buf is None:
            device = out.device if self.device is None else torch.device(self.device)
            pin = device.type == "cpu" and out.is_cuda
            self.buf = torch.empty((self.B, self.L, out.shape[-1]), dtype=out.dtype, device=device, pin_memory=pin)
        self.buf[:, s:e].copy_(out.detach(), non_blocking=True)


def chunk_spans(prompt_length: int, chunk_size: int, window_size: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` covering the prompt in chunks of ``chunk_size`` tokens, the last one
    holding at least the observation window (the chunk before it gives way)."""
    starts = list(range(0, prompt_length, chunk_size))
    if len(starts) > 1 and prompt_length - starts[-1] < window_size:
        starts[-1] = prompt_length - window_size
    return list(zip(starts, starts[1:] + [prompt_length]))


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def prefill_memory(model, cache: SnapKVCache, batch: int, prompt_length: int,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, hidden_device=None, padded: bool = False) -> Dict[str, int]:
    """Bytes a layer-major prefill adds to the loaded model, by part: ``hidden`` (all L tokens'
    hidden states: 0 on the device if ``hidden_device="cpu"`` with the model on a GPU), ``layer_kv``
    (the largest layer's full KV plus its selection), ``cache`` (every layer's compressed KV and
    decode reserve), ``chunk`` (one chunk's activations; where a layer runs the model's masked
    attention (:func:`unmasked_layers`; ``padded``: a left-padded batch), its bool mask over the
    keys so far and the additive copy of it torch's SDPA makes), ``attention`` (what the
    attention adds over the keys so far: with GQA, Transformers' sdpa and eager attention repeat
    the KV heads for a masked chunk, H_q / H_kv times one layer's KV; eager attention also holds the
    chunk's scores and probabilities in float32; an unmasked chunk holds chunk-sized terms only)
    and ``total``."""
    cfg = _text_config(model)
    p = next(model.parameters())
    elem = torch.finfo(p.dtype).bits // 8 if p.dtype.is_floating_point else 4
    B, L, c = batch, prompt_length, min(chunk_size, prompt_length)
    reserve = cache.config.reserve
    kept, full = [], []
    for layer, att in zip(cache.layers, cache._attention.values()):
        m = att.module
        per_entry = 2 * B * att.kv_heads * m.head_dim * elem  # this process's heads under tensor parallelism
        if isinstance(layer, SnapKVLayer):
            cap = min(L, layer.capacity_for(L))  # under a per-head policy: the heads' mean
            kept.append(per_entry * (cap + reserve))
            full.append(per_entry * (L + reserve) + kept[-1])
        else:
            kept.append(per_entry * (att.sliding_window - 1))
            full.append(per_entry * (att.sliding_window - 1 + c))
    H = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", 4 * H) or 4 * H
    experts = getattr(cfg, "num_experts_per_tok", 1) or 1
    heads = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) else H
    # one chunk: residual, norm, q/k/v/o, MLP (gate, up, act), attention output; the bool mask
    # over the keys so far, and the additive copy torch's SDPA makes of it in the query's dtype;
    # the logits of the last position (float32)
    masked = c < L and len(unmasked_layers(model, None, padded)) < len(cache.layers)
    chunk = (B * c * (6 * H + 3 * heads + 3 * inter * experts) * elem + B * c * L * (1 + elem) * masked
             + B * cfg.vocab_size * 4)
    attention = 0
    a = next(iter(cache._attention.values()))
    q_heads, D = a.q_heads, a.module.head_dim
    if masked:  # a chunk attends to more keys than it has queries: the attention gets a mask
        if q_heads != a.kv_heads:
            attention += 2 * B * q_heads * L * D * elem
        if (getattr(cfg, "_attn_implementation", None) or "sdpa").removeprefix(routing.PREFIX) == "eager":
            attention += 2 * B * q_heads * c * L * 4
    elif c < L:  # routing.chunk_attention: the chunk's own keys repeated per query head, the two
        # partial outputs and the folded queries; their float32 merge
        attention += B * q_heads * c * D * ((2 * (q_heads != a.kv_heads) + 3) * elem + 8 * (elem < 4))
    on_cpu = hidden_device is not None and torch.device(hidden_device).type == "cpu" and p.is_cuda
    parts = dict(hidden=0 if on_cpu else B * L * H * elem, layer_kv=max(full) - kept[full.index(max(full))],
                 cache=sum(kept), chunk=chunk, attention=attention)
    parts["total"] = sum(parts.values())
    return parts


def _free_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def prefill(model, input_ids: Tensor, cache: SnapKVCache, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
            attention_mask: Optional[Tensor] = None, hidden_device=None, allow_longer: bool = False,
            check_memory: bool = True, progress: Optional[Callable[[int, int, int], None]] = None) -> Tensor:
    """Prefill ``input_ids [B, L]`` into ``cache`` layer by layer, in chunks of ``chunk_size``
    tokens; return the logits ``[B, vocab]`` of the last position (float32).

    The cache then holds exactly what ``model(input_ids, cache=cache)`` would have left in it
    (the same SnapKV selection in every layer); continue with ``model.generate`` on the prompt
    plus the next token (module docstring).

    Parameters
    ----------
    chunk_size : tokens per chunk, at least the cache's ``window_size`` (the last chunk holds the
        observation window). Peak memory grows with it through one chunk's activations.
    attention_mask : ``[B, L]`` 1/0, left padding only (as ``generate`` takes it).
    hidden_device : where the hidden states of all L tokens live: None (with the model), or
        ``"cpu"`` to keep them in pinned CPU memory, streamed per chunk, when the GPU cannot hold them.
    allow_longer : run a prompt longer than the model's ``max_position_embeddings``.
    check_memory : refuse to start when :func:`prefill_memory` exceeds the free memory.
    progress : called as ``progress(layer_idx, tokens_done, prompt_length)`` after each chunk.
    """
    if not isinstance(cache, SnapKVCache) or type(cache).__name__ == "DocumentCache":
        raise ValueError(f"cache must be a SnapKVCache, got {type(cache).__name__}")
    attention = attention_layers(model)
    if [id(a.module) for a in attention] != list(cache._attention):
        raise ValueError(f"this SnapKVCache was built for another model ({cache._model_name}); create one per model")
    if cache.get_seq_length() != 0:
        raise ValueError("prefill needs an empty cache (a new SnapKVCache, or cache.reset())")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long \
            or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be a [batch, length] int64 tensor with length >= 1, got "
                         + (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, Tensor)
                            else type(input_ids).__name__))
    B, L = input_ids.shape
    w = cache.config.window_size
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size < w and L > chunk_size:
        raise ValueError(f"chunk_size must be at least window_size ({w}): the last chunk holds the observation "
                         f"window, got {chunk_size}")
    limit = getattr(_text_config(model), "max_position_embeddings", None)
    if limit is not None and L > limit and not allow_longer:
        raise ValueError(f"the prompt has {L} tokens, more than the model's max_position_embeddings ({limit}); "
                         "pass allow_longer=True to run it anyway")
    position_ids = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, L):
            raise ValueError(f"attention_mask must be [batch, length] = {(B, L)}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask}")
        m = attention_mask.to(torch.long)
        pad = L - m.sum(1, keepdim=True)
        if bool(((torch.arange(L, device=m.device)[None] >= pad) != m.bool()).any()):
            raise ValueError("attention_mask: left padding only (tokenizer.padding_side = 'left')")
        position_ids = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)  # as generate() numbers a padded row
        attention_mask = m
    device = next(model.parameters()).device
    if check_memory:
        need = prefill_memory(model, cache, B, L, chunk_size, hidden_device,
                              padded=attention_mask is not None and not bool(attention_mask.bool().all()))
        free = _free_bytes(device)
        if free is not None and need["total"] > free:
            raise MemoryError(f"prefill of {L} tokens needs about {_gib(need['total'])} on {device} (hidden states "
                              f"{_gib(need['hidden'])}, one layer's KV {_gib(need['layer_kv'])}, compressed cache "
                              f"{_gib(need['cache'])}, one chunk {_gib(need['chunk'])}, attention "
                              f"{_gib(need['attention'])}) but {_gib(free)} is free; "
                              "use a smaller chunk_size, hidden_device='cpu', or a smaller budget")
    return run_layer_major(model, input_ids, cache, chunk_spans(L, chunk_size, w), attention_mask=attention_mask,
                           position_ids=position_ids, hidden_device=hidden_device, progress=progress)


def unmasked_layers(model, attention_mask: Optional[Tensor] = None, padded: bool = False) -> set:
    """Indices of the layers whose chunks run :func:`snapkv_ext.routing.chunk_attention` (no
    ``chunk x L`` mask; :func:`snapkv_ext.routing.chunk_attention_applies`) for a batch with this
    ``attention_mask`` (or ``padded``); the others run the model's own attention with its mask."""
    padded = padded or (attention_mask is not None and not bool(attention_mask.bool().all()))
    return {a.layer_idx for a in attention_layers(model) if routing.chunk_attention_applies(model, a, padded)}


def run_layer_major(model, input_ids: Tensor, cache: LayerMajorCache, spans: List[Tuple[int, int]], *,
                    attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                    hidden_device=None, progress: Optional[Callable[[int, int, int], None]] = None) -> Tensor:
    """The layer-major loop over checked arguments (:func:`prefill` checks them): every layer of
    ``cache`` with a ``begin_chunks`` is told the prompt length first. -> last position's logits."""
    B, L = input_ids.shape
    layers = decoder_layers(model)
    for layer in cache.layers:
        if hasattr(layer, "begin_chunks"):
            layer.begin_chunks(L)
    state = _Hidden(B, L, hidden_device)
    originals = list(layers)
    skips = [_Skip(layer) for layer in originals]
    unmasked = unmasked_layers(model, attention_mask)
    logits = None
    try:
        for i in range(len(layers)):
            layers[i] = skips[i]
        with torch.no_grad(), (routing.routed(model) if unmasked else nullcontext()):
            for i, layer in enumerate(originals):
                layers[i] = _Run(layer, i, state)
                cache.focus(i)
                with routing.unmasked_chunks() if i in unmasked else nullcontext():
                    for s, e in spans:
                        state.span = (s, e)
                        out = model(input_ids=input_ids[:, s:e],
                                    attention_mask=None if attention_mask is None else attention_mask[:, :e],
                                    position_ids=(torch.arange(s, e, device=input_ids.device)[None].expand(B, -1)
                                                  if position_ids is None else position_ids[:, s:e]),
                                    use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
                        if progress is not None:
                            progress(i, e, L)
                layers[i] = skips[i]
                logits = out.logits[:, -1]
    except BaseException:
        cache.reset()  # never leave a half-prefilled cache behind
        raise
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        cache.focus(None)
        for layer in cache.layers:
            if hasattr(layer, "begin_chunks"):
                layer.prompt_length = None
    return logits.float()
