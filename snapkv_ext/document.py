"""Read a long document once, ask it many questions: SnapKV selection with each question's own
observation window, without re-reading the document.

    doc = SnapKVDocument(model, doc_ids, compression_ratio=0.25, window_size=32)
    answer = doc.generate(question_ids, max_new_tokens=32)           # [1, new] tokens
    answers = doc.generate([q1_ids, q2_ids, q3_ids], max_new_tokens=32)   # a batch of questions
    # or with generate() directly:
    model.generate(torch.cat([doc_ids, question_ids], 1), cache=doc.cache_for(), ...)  # past_key_values= before 5.24

The document's full KV is computed once and kept off the fast path (in CPU memory, pinned when
the model is on a GPU), one layer streamed in at a time. For each question a fresh SnapKVCache is
backed by it: in every layer the question's tokens attend to the document's full KV, then
SnapKV selects over document + question with the question's own window (exactly what SnapKVCache
would keep on the concatenated prompt from scratch), and only the budget stays resident.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .adapters import AttentionLayer, attention_layers
from .cache import LayerMajorCache, SnapKVCache, cache_kwargs
from .config import DEFAULT_KERNEL_SIZE, SnapKVConfig
from . import stores
from .layers import SlidingWindowLayer, SnapKVLayer

try:
    from transformers.cache_utils import CacheLayerMixin, DynamicCache, DynamicLayer
except ImportError as e:  # pragma: no cover
    raise ImportError("snapkv_ext.document needs transformers>=5.17") from e


def _input_device(model) -> torch.device:
    """Where the model takes its token ids: its input embeddings' device, or where they run when
    accelerate offloads them (``device_map`` with "cpu"/"disk": the weights live on "meta")."""
    embeddings = model.get_input_embeddings()
    device = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else embeddings.weight.device


class _ReadingLayer(DynamicLayer):
    """Copies each update to the document's full KV, off the device (a sliding layer: only the
    window the next token sees), and keeps nothing on the device."""

    def __init__(self, read: list, pin: bool, sliding_window: Optional[int]):
        super().__init__()
        self._copies, self._pin, self._window = read, pin, sliding_window
        self.prompt_length: Optional[int] = None  # layer-major reading: the document's length

    def begin_chunks(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prompt_length is not None:
            # Layer-major reading: hold this layer's chunks here (the one full layer in memory),
            # copy the whole layer when its last chunk is in, then drop it from the device.
            full_k, full_v = super().update(key_states, value_states, *args, **kwargs)
            if full_k.shape[2] == self.prompt_length:
                self.prompt_length = None
                self._keep(full_k, full_v)
                B, H, _, D = full_k.shape  # not a view: that would keep the whole layer alive
                self.keys, self.values = full_k.new_empty((B, H, 0, D)), full_v.new_empty((B, H, 0, D))
            return full_k, full_v
        self._keep(key_states, value_states)
        return key_states, value_states

    def _keep(self, key_states, value_states) -> None:
        k, v = key_states.detach(), value_states.detach()
        if self._window is not None:
            k, v = k[:, :, -(self._window - 1):], v[:, :, -(self._window - 1):]
        k, v = k.to("cpu", copy=True), v.to("cpu", copy=True)
        if self._pin:
            k, v = k.pin_memory(), v.pin_memory()
        self._copies.append((k, v))


class DocumentLayer(SnapKVLayer):
    """A global layer backed by a document's full KV ``[1, H_kv, L, D]`` kept outside the working
    cache (any device) and the post-RoPE queries of its last tokens ``[1, H_q, w, D]``: the first
    prefill attends to the document plus its own tokens, then keeps SnapKV's selection over both
    (with its own window) and drops the backing."""

    def __init__(self, config: SnapKVConfig, attention: AttentionLayer, memory, model_name: str,
                 keys: Tensor, values: Tensor, q_tail: Tensor, **placement):
        super().__init__(config, attention, memory, model_name, **placement)
        self.backing: Optional[Tuple[Tensor, Tensor, Tensor]] = (keys, values, q_tail)
        self.logical = keys.shape[2]

    def visible_length(self) -> int:
        return super().visible_length() + (self.backing[0].shape[2] if self.backing is not None else 0)

    def selects(self, n: int) -> int:
        if self.backing is None:
            return super().selects(n)
        total = self.logical + n
        cap = self.capacity_for(total)
        return cap if total > cap else 0

    def observation_queries(self, hidden_states: Tensor, position_embeddings) -> Tensor:
        n, w = hidden_states.shape[1], self.config.window_size
        if self.backing is None or n >= w:
            return super().observation_queries(hidden_states, position_embeddings)
        # A question shorter than the window: the window reaches into the document, whose last
        # queries were kept when it was read.
        q_tail = self.backing[2].to(hidden_states.device)
        return torch.cat([q_tail[:, :, q_tail.shape[2] - (w - n):],
                          self.attention.window_queries(hidden_states, position_embeddings, n)], dim=2)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> Tuple[Tensor, Tensor]:
        if self.backing is None:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, n, _ = key_states.shape
        if B != 1:
            raise ValueError("a document-backed SnapKVCache takes one question at a time "
                             "(SnapKVDocument.generate batches several)")
        pending = self._take_pending(n)
        dk, dv, _ = self.backing
        dev = key_states.device
        k_all = torch.cat([dk.to(dev, non_blocking=True), key_states], dim=2)
        v_all = torch.cat([dv.to(dev, non_blocking=True), value_states], dim=2)
        total = k_all.shape[2]
        self.backing = None
        return self._select(k_all, v_all, torch.arange(total, device=dev).expand(B, H, total), pending, total)

    def reset(self) -> None:
        super().reset()
        self.backing = None


class DocumentCache(SnapKVCache):
    """A SnapKVCache whose layers start from a :class:`SnapKVDocument`: global layers backed by
    the document's full KV, sliding layers holding the document's last window."""

    def __init__(self, document: "SnapKVDocument", config: SnapKVConfig):
        self._document = document
        super().__init__(document.model, config=config)

    def _new_layer(self, attention: AttentionLayer) -> CacheLayerMixin:
        d, i = self._document, attention.layer_idx
        if attention.sliding_window is not None:
            layer = SlidingWindowLayer(i, attention.sliding_window, self.memory, attention)
            layer.preload(d.keys[i], d.values[i], d.length)
            return layer
        kind = stores.document_layer_class(self.config.store)
        return kind(self.config, attention, self.memory, self._model_name, d.keys[i], d.values[i], d.q_tails[i],
                    rank=self._global.index(i), num_global=len(self._global))


class SnapKVDocument:
    """A document read once; each question re-selects SnapKV's budget from its full KV.

    Parameters
    ----------
    model : a supported causal LM (see SnapKVCache)
    input_ids : Tensor [1, L] or [L]
        The document's token ids (one document; questions are batched in :meth:`generate`).
    max_capacity_prompt, compression_ratio, window_size, kernel_size, pooling, group_reduce, policy, scorer,
    max_capacity_decode, decode_interval, store :
        SnapKV settings applied to document + question (see :class:`SnapKVConfig`); :meth:`save`
        keeps a built-in policy, scorer and store, not one of one's own.
    max_question_tokens : int
        Longest question accepted (default 2048).
    chunk_size : int, optional
        Read the document layer by layer in chunks of this many tokens (:mod:`snapkv_ext.prefill`:
        the same full KV, with one layer's activations for one chunk at a time), for documents one
        forward cannot hold. :meth:`save` / :meth:`load` keep a document read once, ever.
    """

    FORMAT = "snapkv-document/1"

    def __init__(self, model, input_ids: Tensor, *, max_capacity_prompt: Optional[int] = None,
                 compression_ratio: Optional[float] = None, window_size: int = 32, kernel_size: int = DEFAULT_KERNEL_SIZE,
                 pooling: str = "max", group_reduce: str = "mean", max_question_tokens: int = 2048,
                 decode_reserve: int = 128, chunk_size: Optional[int] = None, policy="snapkv", scorer="snapkv",
                 max_capacity_decode: Optional[int] = None, decode_interval: int = 64, store=None):
        self.config = SnapKVConfig(max_capacity_prompt=max_capacity_prompt, compression_ratio=compression_ratio,
                                   window_size=window_size, kernel_size=kernel_size, pooling=pooling,
                                   group_reduce=group_reduce, decode_reserve=decode_reserve, policy=policy,
                                   scorer=scorer, max_capacity_decode=max_capacity_decode,
                                   decode_interval=decode_interval, store=store)
        if not isinstance(max_question_tokens, int) or max_question_tokens < 1:
            raise ValueError(f"max_question_tokens must be a positive integer, got {max_question_tokens!r}")
        ids = self._as_ids(input_ids, "input_ids")
        if ids.shape[1] <= window_size:
            raise ValueError(f"input_ids: the document ({ids.shape[1]} tokens) must be longer than window_size "
                             f"({window_size})")
        self.model = model
        self.max_question_tokens = max_question_tokens
        self._attention = attention_layers(model)
        self.device = _input_device(model)
        self.input_ids = ids.to(self.device)
        self._pin = self.device.type == "cuda"
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < window_size):
            raise ValueError(f"chunk_size must be an integer of at least window_size ({window_size}): the last "
                             f"chunk holds the observation window, got {chunk_size!r}")
        read: list = []  # (keys, values) per layer, as the reading layers copy them
        cache = LayerMajorCache(layers=[_ReadingLayer(read, self._pin, a.sliding_window) for a in self._attention])
        tails = self._read(self.input_ids, cache, chunk_size=chunk_size)
        # Per layer: the document's full KV (a sliding layer: its last window) in CPU memory.
        self.keys: List[Tensor] = [k for k, _ in read]
        self.values: List[Tensor] = [v for _, v in read]
        self.q_tails: List[Tensor] = [tails[i] for i in range(len(self._attention))]

    # -- read once, ever: save and load
    @staticmethod
    def _fingerprint(model) -> dict:
        """What must match for a stored KV to be this model's: the class, the attention shapes, and a
        digest of a few weights (another checkpoint of the same architecture gives other KV)."""
        import hashlib

        att = attention_layers(model)
        h = hashlib.sha1()
        for t in (model.get_input_embeddings().weight[:4], next(att[0].module.parameters()).reshape(-1)[:256]):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return dict(model=type(model).__name__, layers=len(att),
                    shapes=[(a.module.config.num_key_value_heads, a.module.head_dim, a.sliding_window) for a in att],
                    dtype=str(next(model.parameters()).dtype), weights=h.hexdigest()[:16])

    def save(self, path: str) -> None:
        """Write the document to ``path`` (one ``torch.save`` file: its ids, every layer's stored KV
        and last queries, the settings, the model's fingerprint); :meth:`load` reads it back."""
        from . import scorers
        from .policies import describe

        # a policy, scorer or store of one's own: refused
        config = dict(self.config.to_dict(), policy=describe(self.config.policy),
                      scorer=scorers.describe(self.config.scorer), store=stores.describe(self.config.store))
        torch.save(dict(format=self.FORMAT, fingerprint=self._fingerprint(self.model), config=config, max_question_tokens=self.max_question_tokens,
                        input_ids=self.input_ids.cpu(), keys=[k.cpu() for k in self.keys],
                        values=[v.cpu() for v in self.values], q_tails=[q.cpu() for q in self.q_tails]), path)

    @classmethod
    def _check_saved(cls, data, model, path) -> SnapKVConfig:
        """Everything :meth:`load` will use, checked against ``model`` before anything is built:
        each field present with the right type, dtype and shape (layers, KV heads, head size,
        lengths consistent with the stored ids and the settings). -> the settings. One ValueError
        naming the file and what is wrong otherwise."""
        def bad(what: str) -> ValueError:
            return ValueError(f"path: {path}: {what}; the file is damaged or was not written by "
                              f"SnapKVDocument.save: read the document again")

        fmt = data.get("format") if isinstance(data, dict) else None
        prefix = cls.FORMAT.rsplit("/", 1)[0] + "/"
        if not isinstance(fmt, str) or not fmt.startswith(prefix):
            raise ValueError(f"path: {path} is not a document saved by SnapKVDocument.save ({cls.FORMAT})")
        if fmt != cls.FORMAT:
            raise ValueError(f"path: {path} is a saved document of format {fmt!r}, and this snapkv-ext reads "
                             f"{cls.FORMAT!r}: load it with the snapkv-ext version that wrote it, or read the "
                             "document again with this one")
        fields = dict(fingerprint=dict, config=dict, max_question_tokens=int, input_ids=torch.Tensor, keys=list,
                      values=list, q_tails=list)
        for name, kind in fields.items():
            if name not in data:
                raise bad(f"the field {name!r} is missing")
            if not isinstance(data[name], kind) or (kind is int and isinstance(data[name], bool)):
                raise bad(f"{name!r} must be a {kind.__name__}, got {type(data[name]).__name__}")
        here = cls._fingerprint(model)
        for key, want in data["fingerprint"].items():
            if here.get(key) != want:
                raise ValueError(f"this document was read by another model ({key}: saved {want!r}, this model "
                                 f"{here.get(key)!r}); read it again with this one")
        if set(data["fingerprint"]) != set(here):
            raise bad(f"the model fingerprint has fields {sorted(data['fingerprint'])}, expected {sorted(here)}")
        try:
            config = SnapKVConfig(**data["config"])
        except (TypeError, ValueError) as e:
            raise bad(f"its settings are not valid SnapKV settings ({e})") from None
        if data["max_question_tokens"] < 1:
            raise bad(f"max_question_tokens must be positive, got {data['max_question_tokens']}")
        ids = data["input_ids"]
        if ids.dtype != torch.long or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] <= config.window_size:
            raise bad(f"input_ids must be int64 [1, L] with L > window_size ({config.window_size}), got "
                      f"{ids.dtype} {list(ids.shape)}")
        L, w = ids.shape[1], config.window_size
        att = attention_layers(model)
        dtype = next(model.parameters()).dtype
        for name in ("keys", "values", "q_tails"):
            if len(data[name]) != len(att):
                raise bad(f"{name!r} has {len(data[name])} layers, this model {len(att)}")
        for i, a in enumerate(att):
            D = a.module.head_dim
            n = L if a.sliding_window is None else min(L, a.sliding_window - 1)
            want = {"keys": [1, a.kv_heads, n, D], "values": [1, a.kv_heads, n, D], "q_tails": [1, a.q_heads, w, D]}
            for name, shape in want.items():
                t = data[name][i]
                if not isinstance(t, torch.Tensor) or list(t.shape) != shape or t.dtype != dtype:
                    got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise bad(f"{name}[{i}] must be {dtype} {shape} (layer {i}: {a.kv_heads if name != 'q_tails' else a.q_heads} "
                              f"heads of {D}, {L} document tokens), got {got}")
        return config

    @classmethod
    def load(cls, model, path: str) -> "SnapKVDocument":
        """A document :meth:`save` wrote, for ``model`` (the model that read it: refused otherwise),
        without reading the document again."""
        import pickle

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"path: cannot read a saved document from {path} ({type(e).__name__})") from None
        config = cls._check_saved(data, model, path)
        doc = cls.__new__(cls)
        doc.config = config
        doc.max_question_tokens = data["max_question_tokens"]
        doc.model = model
        doc._attention = attention_layers(model)
        doc.device = _input_device(model)
        doc._pin = doc.device.type == "cuda"
        doc.input_ids = data["input_ids"].to(doc.device)
        pin = (lambda t: t.pin_memory()) if doc._pin else (lambda t: t)
        doc.keys = [pin(k) for k in data["keys"]]
        doc.values = [pin(v) for v in data["values"]]
        doc.q_tails = [q.to(doc.device) for q in data["q_tails"]]
        return doc

    def _read(self, ids: Tensor, cache, chunk_size: Optional[int] = None, **forward_kwargs) -> dict:
        """Run `ids` through the model with `cache` (in one forward, or layer by layer in chunks:
        :mod:`snapkv_ext.prefill`); return each layer's post-RoPE queries of the last (up to)
        window_size tokens (the last chunk holds them)."""
        w = self.config.window_size
        tails = {}

        by_module = {id(a.module): a for a in self._attention}

        def grab(module, args, kwargs):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            tails[module.layer_idx] = by_module[id(module)].window_queries(
                hs, kwargs["position_embeddings"], min(w, hs.shape[1])).detach()

        handles = [a.module.register_forward_pre_hook(grab, with_kwargs=True) for a in self._attention]
        try:
            if chunk_size is not None:
                from .prefill import chunk_spans, run_layer_major

                spans = chunk_spans(ids.shape[1], chunk_size, self.config.window_size)
                run_layer_major(self.model, ids, cache, spans, **forward_kwargs)
            else:
                with torch.no_grad():
                    self.model(ids, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1,
                               **forward_kwargs)
        finally:
            for h in handles:
                h.remove()
        return tails

    def append(self, token_ids: Tensor) -> None:
        """Continue the conversation: add `token_ids` (e.g. a question and its answer) to the
        document, so that the next question sees the whole conversation so far and re-selects
        from all of it. The new tokens attend to everything before them, as in one long prompt."""
        ids = self._question(token_ids)
        n, w = ids.shape[1], self.config.window_size
        keep_all = SnapKVConfig(max_capacity_prompt=2**62, window_size=w)  # attend, select nothing
        cache = self._backed_cache(keep_all)
        pos = torch.arange(self.length, self.length + n, device=ids.device)[None]
        tails = self._read(ids, cache, position_ids=pos)
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys.to("cpu"), layer.values.to("cpu")
            self.keys[i], self.values[i] = (k.pin_memory(), v.pin_memory()) if self._pin else (k, v)
            self.q_tails[i] = torch.cat([self.q_tails[i], tails[i]], dim=2)[:, :, -w:]
        self.input_ids = torch.cat([self.input_ids, ids], dim=1)

    @staticmethod
    def _as_ids(x, name: str) -> Tensor:
        if not isinstance(x, Tensor) or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be a tensor of token ids, got {type(x).__name__}"
                             + (f" of {x.dtype}" if isinstance(x, Tensor) else ""))
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[0] != 1:
            raise ValueError(f"{name} must be [L] or [1, L], got {list(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} is empty")
        return x.long()

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def nbytes(self) -> int:
        """Bytes of the document's full KV (held off the device)."""
        return sum(2 * k.numel() * k.element_size() for k in self.keys)

    def cache_for(self, model=None, config: Optional[SnapKVConfig] = None) -> SnapKVCache:
        """A fresh SnapKVCache backed by this document: pass it to ``model.generate`` with
        ``input_ids = cat(document ids, question ids)`` (only the question is run). ``config``:
        other settings than the document's (a budget, a policy, pooling; the window at most the
        document's, whose last queries it kept), e.g. to compare settings on one reading."""
        if model is not None and model is not self.model:
            raise ValueError("this document was read by another model; read it again with this one")
        if config is None:
            return self._backed_cache(self.config)
        if not isinstance(config, SnapKVConfig):
            raise ValueError(f"config must be a SnapKVConfig, got {type(config).__name__}")
        if config.window_size > self.config.window_size:
            raise ValueError(f"config: window_size {config.window_size} is larger than the document's "
                             f"({self.config.window_size}), whose last queries it kept")
        return self._backed_cache(config)

    def _backed_cache(self, config: SnapKVConfig) -> SnapKVCache:
        return DocumentCache(self, config)

    def _question(self, q) -> Tensor:
        q = self._as_ids(q, "question_ids")
        if q.shape[1] > self.max_question_tokens:
            raise ValueError(f"question_ids: {q.shape[1]} tokens is longer than max_question_tokens "
                             f"({self.max_question_tokens})")
        return q.to(self.input_ids.device)

    def prefill(self, question_ids) -> tuple:
        """Run one question through the model against the document: (cache, last logits [1, V])."""
        q = self._question(question_ids)
        cache = self.cache_for()
        pos = torch.arange(self.length, self.length + q.shape[1], device=q.device)[None]
        with torch.no_grad():
            logits = self.model(q, position_ids=pos, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1).logits
        return cache, logits[:, -1]

    def generate(self, question_ids: Union[Tensor, Sequence[Tensor]], max_new_tokens: int = 32, **generate_kwargs):
        """Answer one question (a tensor: returns ``[1, new]`` tokens, through ``model.generate``
        with any of its options) or several (a list: greedy, batched decoding; returns a list of
        token lists, each equal to asking that question alone)."""
        if isinstance(question_ids, Tensor):
            q = self._question(question_ids)
            ids = torch.cat([self.input_ids, q], dim=1)
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(self.model, self.cache_for()),
                                          max_new_tokens=max_new_tokens, **generate_kwargs)
            return out[:, ids.shape[1]:]
        if generate_kwargs:
            raise ValueError("a batch of questions decodes greedily; generate options are for one question")
        questions = list(question_ids)
        if not questions:
            raise ValueError("question_ids: an empty list of questions")
        return self._generate_batch(questions, max_new_tokens)

    def _generate_batch(self, questions: List[Tensor], max_new_tokens: int) -> List[List[int]]:
        if any(a.sliding_window is not None for a in self._attention) or not self.config.one_layout:
            # Sliding and global layers (or, under a budget policy or the ragged store, layers and
            # heads) hold different lengths, which one left-padded 2D mask cannot describe: each
            # question is decoded on its own (same answers, no batching).
            return [self.generate(q, max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
                    for q in questions]
        prefills = [self.prefill(q) for q in questions]
        B = len(prefills)
        caches = [c for c, _ in prefills]
        tok = torch.stack([lg.argmax(-1) for _, lg in prefills])  # [B, 1]
        dev = tok.device
        # One batched cache for decoding: each row's kept entries, left-padded to the longest.
        P = max(c.layers[0].physical for c in caches)
        batched = DynamicCache()
        for i in range(len(self._attention)):
            ks, vs = [], []
            for c in caches:
                k, v = c.layers[i].keys, c.layers[i].values
                pad = P - k.shape[2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            batched.update(torch.cat(ks), torch.cat(vs), i)
        mask = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, c in enumerate(caches):
            mask[b, P - c.layers[0].physical:] = 1
        positions = torch.tensor([[c.get_seq_length()] for c in caches], device=dev)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        out = [[int(t)] for t in tok[:, 0]]
        done = [t[0] in eos for t in out]
        with torch.no_grad():
            for _ in range(max_new_tokens - 1):
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
                logits = self.model(tok, position_ids=positions, attention_mask=mask, **cache_kwargs(self.model, batched),
                                    use_cache=True).logits
                tok = logits[:, -1:].argmax(-1)
                positions = positions + 1
                for b in range(B):
                    if not done[b]:
                        out[b].append(int(tok[b, 0]))
                        done[b] = out[b][-1] in eos
        return out
