"""Selection policies: how SnapKV's budget is spread over layers and over each layer's KV heads.

SnapKV gives every KV head of every global layer the same budget. A policy decides

- ``layer_capacities(max_capacity_prompt, window_size, num_layers)``: the kept entries per KV
  head (window included) of each global layer, from the uniform budget; and
- ``head_counts(scores, budget, valid)``: how a layer's prefix budget (``budget`` entries per
  head on average, the window not counted) is split over its KV heads, from SnapKV's pooled
  window votes ``scores [B, H_kv, P]`` (``P = L - window_size``; ``valid [B, H_kv]``: how many
  prefix positions of each head are real entries, the last ones; the others are left padding).

Each head then keeps its own best ``counts[b, h]`` prefix positions (by its pooled score) and the
whole observation window. A policy whose counts may differ between the heads of a layer says
``per_head = True``: its layers are stored ragged (:class:`snapkv_ext.layers.RaggedSnapKVLayer`,
exactly what is kept, decoded through :func:`snapkv_ext.ops.ragged_attention`).

Built in (:data:`POLICIES`): ``snapkv`` (uniform, the default), ``pyramidkv`` (layer budgets
falling linearly from the lowest to the highest layer, same total), ``adakv`` (per layer: a floor
per head, then one top-k over all heads' pooled scores) and ``ada-pyramidkv`` (both). A policy of
one's own is a small class with these two methods and ``per_head`` (docs/policies.md);
:func:`resolve` checks it. :mod:`snapkv_ext.reference` has a float64 plain-torch reference of each.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["SelectionPolicy", "PyramidKV", "AdaKV", "AdaPyramidKV", "POLICIES", "resolve", "describe",
           "prefix_ranks", "keep_mask", "valid_prefix"]


class SelectionPolicy:
    """SnapKV's own policy: every global layer and every KV head keeps the same budget.

    Subclass it (or write any class with the same two methods and ``per_head``) to make a policy.
    """

    name = "snapkv"
    per_head = False

    def layer_capacities(self, max_capacity_prompt: int, window_size: int, num_layers: int) -> List[int]:
        """Kept entries per KV head, window included, of each of the ``num_layers`` global layers
        (lowest first), for a uniform budget of ``max_capacity_prompt``."""
        return [max_capacity_prompt] * num_layers

    def head_counts(self, scores: Tensor, budget: int, valid: Tensor) -> Tensor:
        """Prefix entries each KV head keeps: ``[B, H_kv]`` int64, ``counts[b, h] <= valid[b, h]``, at
        most ``H_kv * budget`` per row (exactly ``sum_h min(budget, valid[b, h])`` for the built-in
        policies: a head with fewer real entries than the budget cannot lend what it lacks)."""
        return valid.clamp(max=budget).to(torch.int64).clone()

    def params(self) -> dict:
        """The constructor's arguments (``type(self)(**self.params())`` is the same policy)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v:g}' for k, v in self.params().items())})"

    # two policies are the same when their class and their params() are (configs compare equal)
    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.params() == other.params()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))


class PyramidKV(SelectionPolicy):
    """PyramidKV: the prefix budget of global layer ``l`` of ``n`` falls linearly from
    ``2 k - k / beta`` (lowest layer) to ``k / beta`` (highest), ``k = max_capacity_prompt -
    window_size``; the total over layers is exactly ``n k`` (the remainder of the rounding goes to
    the lowest layers)."""

    name = "pyramidkv"

    def __init__(self, beta: float = 20.0):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 1:
            raise ValueError(f"PyramidKV: beta must be a number >= 1, got {beta!r}")
        self.beta = float(beta)

    def layer_capacities(self, max_capacity_prompt: int, window_size: int, num_layers: int) -> List[int]:
        k = max_capacity_prompt - window_size
        if num_layers <= 1:
            return [max_capacity_prompt] * num_layers
        low = k / self.beta
        high = 2 * k - low
        step = (high - low) / (num_layers - 1)
        budgets = [int(math.floor(high - i * step)) for i in range(num_layers)]
        for i in range(num_layers * k - sum(budgets)):  # the rounding's remainder, lowest layers first
            budgets[i % num_layers] += 1
        return [b + window_size for b in budgets]

    def params(self) -> dict:
        return {"beta": self.beta}


def prefix_ranks(scores: Tensor, valid: Tensor) -> Tensor:
    """Each head's prefix positions from best to worst: ``[B, H, P]`` int64. The ranking rule of
    every op (:func:`snapkv_ext.ops.select_topk`): by score, NaN below everything, ties to the
    lower position; left padding (the first ``P - valid[b, h]`` positions) after all of it."""
    P = scores.shape[-1]
    j = torch.arange(P, device=scores.device)
    return _best_first(scores, j[None, None, :] < (P - valid.to(scores.device))[:, :, None])


def _best_first(scores: Tensor, excluded: Tensor) -> Tensor:
    """Indices along the last dim from best to worst: by score (stable sorts: ties to the lower
    index), NaN below every score, the ``excluded`` entries after all of them."""
    x = scores.nan_to_num(nan=float("-inf")).masked_fill(excluded, float("-inf"))
    cls = (scores.isnan() & ~excluded).to(torch.uint8) + 2 * excluded.to(torch.uint8)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    return order.gather(-1, torch.sort(cls.gather(-1, order), dim=-1, stable=True).indices)


def _masked_scores(scores: Tensor, pad: Tensor) -> Tensor:
    """Scores with NaN and each head's first ``pad[b, h]`` positions (left padding) at -inf."""
    P = scores.shape[-1]
    j = torch.arange(P, device=scores.device)
    return scores.nan_to_num(nan=float("-inf")).masked_fill(j[None, None, :] < pad.to(scores.device)[..., None],
                                                            float("-inf"))


def _best_mask(x: Tensor, r: int) -> Optional[Tensor]:
    """The ``r`` best entries of 1-D ``x`` (ties to the lower index) as a bool mask, from its r-th
    largest value (no sort); None when that is -inf (NaN or padding would be chosen)."""
    n = x.shape[0]
    if r <= 0:
        return torch.zeros(n, dtype=torch.bool, device=x.device)
    t = torch.kthvalue(x, n - r + 1).values
    if bool(t == float("-inf")):
        return None
    above = x > t
    tied = x == t
    return above | (tied & (tied.cumsum(0) <= r - int(above.sum())))


class AdaKV(SelectionPolicy):
    """AdaKV: per layer and batch row, each KV head first keeps a floor of ``floor * k`` (rounded
    down) of its best prefix positions, ``k`` the uniform prefix budget; the rest of the layer's
    ``H_kv * k`` goes to the best remaining positions over all heads' pooled scores together (one
    top-k, ties to the lower head, then the lower position)."""

    name = "adakv"
    per_head = True

    def __init__(self, floor: float = 0.2):
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 1:
            raise ValueError(f"AdaKV: floor must be a fraction in [0, 1), got {floor!r}")
        self.floor = float(floor)

    def head_counts(self, scores: Tensor, budget: int, valid: Tensor) -> Tensor:
        B, H, P = scores.shape
        valid = valid.to(device=scores.device, dtype=torch.int64)
        k = valid.clamp(max=budget)  # [B, H]
        floor = torch.floor(self.floor * k.double()).to(torch.int64)
        rest = (k - floor).sum(1)  # [B]
        # CPU: k-th values instead of sorts (torch's CPU sort is slow); CUDA: the sorts (fast there,
        # and no host sync per head)
        fast = self._counts_by_threshold(scores, valid, floor, rest) if scores.device.type == "cpu" else None
        if fast is not None:
            return fast
        order = prefix_ranks(scores, valid)
        ranked = scores.gather(-1, order)
        r = torch.arange(P, device=scores.device)
        # Candidates for the shared part: each head's positions after its floor, padding excluded.
        open_ = (r[None, None, :] >= floor[..., None]) & (r[None, None, :] < valid[..., None])
        flat = _best_first(ranked.reshape(B, H * P), ~open_.reshape(B, H * P))
        chosen = torch.zeros(B, H * P, dtype=torch.int64, device=scores.device)
        take = (torch.arange(H * P, device=scores.device)[None, :] < rest[:, None]).to(torch.int64)
        chosen.scatter_(1, flat, take)
        return floor + chosen.view(B, H, P).sum(-1)

    @staticmethod
    def _counts_by_threshold(scores: Tensor, valid: Tensor, floor: Tensor, rest: Tensor) -> Optional[Tensor]:
        """The same counts without sorting (a k-th value per head and per row, the sorts' rule for
        ties); None when a choice reaches a NaN or padding (the sorting path decides those)."""
        B, H, P = scores.shape
        floors = _keep_by_threshold(scores, floor, P - valid)
        if floors is None:
            return None
        y = _masked_scores(scores, P - valid).masked_fill(floors, float("-inf")).reshape(B, H * P)
        counts = floor.clone()
        for b in range(B):
            m = _best_mask(y[b], int(rest[b]))
            if m is None:
                return None
            counts[b] += m.view(H, P).sum(-1)
        return counts

    def params(self) -> dict:
        return {"floor": self.floor}


class AdaPyramidKV(AdaKV):
    """PyramidKV's layer budgets, each split over the heads as AdaKV does."""

    name = "ada-pyramidkv"

    def __init__(self, floor: float = 0.2, beta: float = 20.0):
        super().__init__(floor)
        self._pyramid = PyramidKV(beta)

    def layer_capacities(self, max_capacity_prompt: int, window_size: int, num_layers: int) -> List[int]:
        return self._pyramid.layer_capacities(max_capacity_prompt, window_size, num_layers)

    def params(self) -> dict:
        return {"floor": self.floor, "beta": self._pyramid.beta}


POLICIES = {p.name: p for p in (SelectionPolicy, PyramidKV, AdaKV, AdaPyramidKV)}


def resolve(policy) -> SelectionPolicy:
    """A policy object from a name in :data:`POLICIES` or an object with ``layer_capacities``,
    ``head_counts`` and ``per_head`` (checked here, one line naming what is missing)."""
    if isinstance(policy, dict) and isinstance(policy.get("name"), str) and policy["name"] in POLICIES:
        return POLICIES[policy["name"]](**{k: v for k, v in policy.items() if k != "name"})  # describe()'s
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)} or a policy object, got {policy!r}")
        return POLICIES[policy]()
    if isinstance(policy, type):
        raise ValueError(f"policy must be a policy object, not the class {policy.__name__} (write {policy.__name__}())")
    missing = [m for m in ("layer_capacities", "head_counts") if not callable(getattr(policy, m, None))]
    if not isinstance(getattr(policy, "per_head", None), bool):
        missing.append("per_head (a bool)")
    if missing:
        raise ValueError(f"policy {type(policy).__name__} lacks {', '.join(missing)}: a policy needs "
                         "layer_capacities(max_capacity_prompt, window_size, num_layers), "
                         "head_counts(scores, budget, valid) and per_head (see snapkv_ext.policies)")
    return policy


def describe(policy) -> dict:
    """A built-in policy as plain data (``{"name": ..., **params}``), what a saved document
    stores; :func:`resolve` reads it back. A policy of one's own is refused in one line."""
    if type(policy) not in POLICIES.values():
        raise ValueError(f"policy {type(policy).__name__} is not a built-in policy ({', '.join(POLICIES)}): "
                         "it cannot be saved with a document")
    return {"name": policy.name, **policy.params()}


def check_capacities(policy, capacities, max_capacity_prompt: int, window_size: int, num_layers: int) -> List[int]:
    """``capacities`` as ints, or one line saying what a policy's ``layer_capacities`` got wrong."""
    name = getattr(policy, "name", type(policy).__name__)
    try:
        caps = [int(c) for c in capacities]
    except (TypeError, ValueError):
        raise ValueError(f"policy {name}: layer_capacities must return {num_layers} integers, got {capacities!r}")
    if len(caps) != num_layers or any(c <= window_size for c in caps):
        raise ValueError(f"policy {name}: layer_capacities({max_capacity_prompt}, {window_size}, {num_layers}) must "
                         f"return {num_layers} integers larger than window_size, got {caps}")
    return caps


def check_counts(policy, counts, budget: int, valid: Tensor, shape) -> Tensor:
    """``counts`` checked against what ``head_counts`` promises (one line if not)."""
    name = getattr(policy, "name", type(policy).__name__)
    B, H = shape
    if not isinstance(counts, Tensor) or tuple(counts.shape) != (B, H):
        raise ValueError(f"policy {name}: head_counts must return a [{B}, {H}] integer tensor, got "
                         + (f"{tuple(counts.shape)}" if isinstance(counts, Tensor) else type(counts).__name__))
    counts = counts.to(torch.int64)
    v = valid.to(counts.device, torch.int64)
    if bool((counts < 0).any()) or bool((counts > v).any()) or bool((counts.sum(1) > H * budget).any()):
        raise ValueError(f"policy {name}: head_counts must give each head 0..valid entries and each row at most "
                         f"H_kv * budget = {H * budget} in all, got {counts.tolist()} (valid {v.tolist()})")
    return counts


def valid_prefix(pad_lengths: Optional[Tensor], B: int, H: int, P: int, device) -> Tensor:
    """``[B, H]`` int64: the prefix positions of each row (``pad_lengths [B]``) or head
    (``[B, H]``) that are not left padding."""
    return (P - _head_padding(pad_lengths, B, H, device)).clamp(min=0)


def _head_padding(pad_lengths: Optional[Tensor], B: int, H: int, device) -> Tensor:
    """Left padding ``[B, H]`` int64 from ``pad_lengths`` ``[B]`` or ``[B, H]`` (None: zeros)."""
    if pad_lengths is None:
        return torch.zeros((B, H), dtype=torch.int64, device=device)
    pad = pad_lengths.to(device=device, dtype=torch.int64)
    return pad[:, None].expand(B, H) if pad.dim() == 1 else pad


def _keep_by_threshold(scores: Tensor, counts: Tensor, pad: Tensor) -> Optional[Tensor]:
    """Each head's best ``counts[b, h]`` prefix positions without sorting (None: see _best_mask)."""
    B, H, P = scores.shape
    x = _masked_scores(scores, pad)
    keep = torch.zeros(B, H, P, dtype=torch.bool, device=scores.device)
    for b in range(B):
        for h in range(H):
            m = _best_mask(x[b, h], int(counts[b, h]))
            if m is None:
                return None
            keep[b, h] = m
    return keep


def keep_mask(scores: Tensor, counts: Tensor, pad_lengths: Optional[Tensor], window_size: int) -> Tensor:
    """Which of the ``L = P + window_size`` entries each head keeps: ``[B, H, L]`` bool, its best
    ``counts[b, h]`` prefix positions and every window entry that is not left padding
    (``pad_lengths [B]`` or ``[B, H]``, up to ``L``; None: no padding)."""
    B, H, P = scores.shape
    pad = _head_padding(pad_lengths, B, H, scores.device)
    keep = _keep_by_threshold(scores, counts, pad.clamp(max=P)) if scores.device.type == "cpu" else None
    if keep is None:
        order = prefix_ranks(scores, (P - pad).clamp(min=0))
        r = torch.arange(P, device=scores.device)
        keep = torch.zeros(B, H, P, dtype=torch.bool, device=scores.device)
        keep.scatter_(-1, order, r[None, None, :] < counts.to(scores.device)[..., None])
    j = torch.arange(P, P + window_size, device=scores.device)
    window = j[None, None, :] >= pad[..., None]  # a row shorter than the window: padding in it too
    return torch.cat([keep, window], dim=-1)
