"""Scorers: how important each cached prompt entry is, one class per method.

When a layer compresses, its scorer gives each prefix entry (every position before the
observation window) of every KV head a score, ``[B, H_kv, P]`` with ``P = L - window_size``,
higher is kept first. The budget policy (:mod:`snapkv_ext.policies`) then says how many entries
each layer and head keeps, and the layer keeps the best of them plus the whole window (the store,
dense or ragged, is the layer's business). Any scorer works with any policy and either store.

A scorer sees a :class:`ScoreInput`: the layer's keys and values ``[B, H_kv, L, D]``, the
post-RoPE queries of the observation window ``[B, H_q, w, D]`` (the last ``window_size`` prompt
tokens; a scorer that needs no queries ignores them), each row's left padding, and the
attention's logit transform (scale, soft-cap). Left padding is the layer's business too: the
scores of padded positions are ignored (ranked last).

Built in (:data:`SCORERS`), each checked against a float64 oracle written from its paper
(``tests/test_scorers.py``):

- ``snapkv`` (:class:`SnapKV`, the default): the window queries' softmax votes, pooled (SnapKV,
  Li et al. 2024); runs the fused native op where it can.
- ``streamingllm`` (:class:`StreamingLLM`): the first ``sinks`` tokens (attention sinks) and the
  most recent ones (Xiao et al. 2024); no queries.
- ``keynorm`` (:class:`KeyNorm`): the keys of smallest L2 norm (Devoto et al. 2024); no queries.
- ``tova`` (:class:`TOVA`): the attention of the last prompt token, averaged over all the layer's
  query heads, so one ranking per layer (Oren et al. 2024).
- ``vatp`` (:class:`VATP`): the window's attention votes times the value's L1 norm (Guo et al.
  2024, "value also matters"), unpooled.

A scorer of one's own is one small class: ``name``, ``score(inp)`` and ``params()``
(docs/extending.md); :func:`resolve` checks it.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["ScoreInput", "Scorer", "SnapKV", "StreamingLLM", "KeyNorm", "TOVA", "VATP", "SCORERS", "resolve",
           "describe"]


class ScoreInput(NamedTuple):
    """What a scorer sees when a layer compresses."""

    keys: Tensor  # [B, H_kv, L, D]
    values: Tensor  # [B, H_kv, L, D]
    q_window: Tensor  # [B, H_q, w, D] post-RoPE queries of the observation window, in the keys' dtype
    pad_lengths: Optional[Tensor]  # [B] int64 left padding of each row (clamped to L - w), or None
    scale: float  # the attention's logit scale
    softcap: Optional[float]  # its logit soft-cap (Gemma 2), or None
    config: object  # the cache's SnapKVConfig (kernel_size, pooling, group_reduce, use_reference)

    @property
    def prefix(self) -> int:
        """P: the positions scored (the window is always kept)."""
        return self.keys.shape[2] - self.q_window.shape[2]


class Scorer:
    """The base of every scorer: subclass it (or write any class with ``name``, ``score`` and
    ``params``). Two scorers are the same when their class and ``params()`` are."""

    name = "scorer"

    def score(self, inp: ScoreInput) -> Tensor:  # pragma: no cover - every scorer defines it
        """``[B, H_kv, P]`` scores of the prefix positions, higher kept first (float)."""
        raise NotImplementedError

    def params(self) -> dict:
        """The constructor's arguments (``type(self)(**self.params())`` is the same scorer)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.params() == other.params()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))


def _ops(inp: ScoreInput):
    from . import ops, reference

    return reference if inp.config.use_reference else ops


class SnapKV(Scorer):
    """SnapKV: each prefix entry's mean softmax probability under the window's queries (a GQA
    group's heads reduced by ``group_reduce``), pooled over ``kernel_size`` neighbours. The layers
    run it fused with the top-k and the gather (:func:`snapkv_ext.ops.snapkv_compress_into`) under
    the uniform policy."""

    name = "snapkv"
    fused = True  # the layer may use the fused native compress instead of score()

    def score(self, inp: ScoreInput) -> Tensor:
        cfg, mod = inp.config, _ops(inp)
        s = mod.window_scores(inp.q_window, inp.keys, inp.pad_lengths, cfg.group_reduce, scale=inp.scale,
                              softcap=inp.softcap)
        return mod.pool_scores(s, cfg.kernel_size, cfg.pooling, inp.pad_lengths)


class StreamingLLM(Scorer):
    """StreamingLLM: keep the first ``sinks`` tokens of each row (after its padding) and the most
    recent ones; the queries are not used."""

    name = "streamingllm"

    def __init__(self, sinks: int = 4):
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"StreamingLLM: sinks must be a non-negative integer, got {sinks!r}")
        self.sinks = sinks

    def score(self, inp: ScoreInput) -> Tensor:
        B, H, P = inp.keys.shape[0], inp.keys.shape[1], inp.prefix
        j = torch.arange(P, device=inp.keys.device, dtype=torch.float32)
        pad = torch.zeros(B, device=j.device) if inp.pad_lengths is None else inp.pad_lengths.to(j.device, j.dtype)
        s = j.expand(B, H, P).clone()  # recency: the later the better
        return s.masked_fill((j[None, :] - pad[:, None] < self.sinks)[:, None, :], float("inf"))

    def params(self) -> dict:
        return {"sinks": self.sinks}


class KeyNorm(Scorer):
    """Key-norm: keep the keys of smallest L2 norm (a low-norm key draws high attention); the
    queries are not used."""

    name = "keynorm"

    def score(self, inp: ScoreInput) -> Tensor:
        return -torch.linalg.vector_norm(inp.keys[:, :, : inp.prefix].float(), dim=-1)


def _window_probs(inp: ScoreInput, last: int) -> Tensor:
    """Softmax probabilities ``[B, H_q, last, P]`` of the window's last ``last`` queries over the
    prefix (which every window query sees), with the attention's scale and soft-cap, in float32;
    the softmax runs over every key the query sees (prefix and the window up to itself)."""
    q = inp.q_window[:, :, -last:].float()
    B, Hq, w, D = q.shape[0], q.shape[1], inp.q_window.shape[2], q.shape[3]
    Hkv, L = inp.keys.shape[1], inp.keys.shape[2]
    # a GQA group's query heads as rows of their KV head (the keys are not repeated)
    qg = q.reshape(B, Hkv, (Hq // Hkv) * last, D)
    logits = torch.matmul(qg, inp.keys.float().transpose(-1, -2)).view(B, Hq, last, L) * inp.scale
    if inp.softcap:
        logits = inp.softcap * torch.tanh(logits / inp.softcap)
    i = torch.arange(L - last, L, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    visible = j <= i
    if inp.pad_lengths is not None:
        visible = visible[None] & (j >= inp.pad_lengths.to(q.device)[:, None, None])
        visible = visible[:, None]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return probs[..., : L - w]


class TOVA(Scorer):
    """TOVA (token omission via attention): keep the entries the last prompt token attends to most,
    its attention averaged over all the layer's query heads (one ranking shared by the layer's
    KV heads)."""

    name = "tova"

    def score(self, inp: ScoreInput) -> Tensor:
        p = _window_probs(inp, 1)[:, :, 0]  # [B, H_q, P]
        return p.mean(1, keepdim=True).expand(-1, inp.keys.shape[1], -1).contiguous()


class VATP(Scorer):
    """Value-aware token pruning: the window queries' mean attention to each entry (a GQA group's
    heads averaged) times the L1 norm of its value."""

    name = "vatp"

    def score(self, inp: ScoreInput) -> Tensor:
        p = _window_probs(inp, inp.q_window.shape[2]).mean(2)  # [B, H_q, P]
        B, Hq, P = p.shape
        Hkv = inp.keys.shape[1]
        votes = p.view(B, Hkv, Hq // Hkv, P).mean(2)
        return votes * inp.values[:, :, :P].float().abs().sum(-1)


SCORERS = {cls.name: cls for cls in (SnapKV, StreamingLLM, KeyNorm, TOVA, VATP)}


def resolve(scorer) -> Scorer:
    """A scorer from its name in :data:`SCORERS` (default parameters), its :func:`describe` form,
    or a scorer object, checked to have ``score`` and ``params``; anything else refused in one line."""
    if isinstance(scorer, dict) and isinstance(scorer.get("name"), str) and scorer["name"] in SCORERS:
        return SCORERS[scorer["name"]](**{k: v for k, v in scorer.items() if k != "name"})
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {', '.join(SCORERS)} or a scorer object, got {scorer!r}")
        return SCORERS[scorer]()
    missing = [m for m in ("score", "params") if not callable(getattr(scorer, m, None))]
    if isinstance(scorer, type) or missing:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)} or a scorer object (with score(inp) and "
                         f"params()), got {scorer!r}")
    return scorer


def describe(scorer) -> dict:
    """A built-in scorer as plain data (``{"name": ..., **params}``), what a saved document stores;
    :func:`resolve` reads it back. A scorer of one's own is refused in one line."""
    if type(scorer) not in SCORERS.values():
        raise ValueError(f"scorer {type(scorer).__name__} is not a built-in scorer ({', '.join(SCORERS)}): "
                         "it cannot be saved with a document")
    return {"name": scorer.name, **scorer.params()}


def check_scores(scorer, scores, shape) -> Tensor:
    """``scores`` checked against what ``score`` promises: a float ``[B, H_kv, P]`` tensor (one
    line naming the scorer if not)."""
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(shape) or not scores.is_floating_point():
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scorer {getattr(scorer, 'name', type(scorer).__name__)}: score() must return a float "
                         f"tensor of shape {tuple(shape)} (batch, KV heads, prefix positions), got {got}")
    return scores
