"""SnapKV settings: one frozen, self-validating record shared by the cache and the document API."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

# The budget when neither max_capacity_prompt nor compression_ratio is given (the paper's 1024).
DEFAULT_MAX_CAPACITY_PROMPT = 1024
# The pooling kernel: 13, what retrieved best at 10% and 5% budgets in the needle sweep
# (benchmarks/RESULTS.md section 14: 20/20 and 15/20 against 17/20 and 10/20 for the published 7).
DEFAULT_KERNEL_SIZE = 13
POOLINGS = ("max", "avg")
GROUP_REDUCES = ("mean", "max", "sum")


def _setting(default, kind: type, help: str):
    """A SnapKVConfig field: its default, and as metadata its value type and help line."""
    return field(default=default, metadata={"type": kind, "help": help})


@dataclass(frozen=True)
class SnapKVConfig:
    """SnapKV settings, validated on construction.

    The budget is one of ``max_capacity_prompt`` (kept prompt entries per KV head, window
    included) or ``compression_ratio`` (fraction of each prompt kept, in (0, 1]); with neither,
    ``max_capacity_prompt = 1024``. In models with sliding-window layers the budget applies to the
    global (full-attention) layers; the sliding layers keep exactly their window.

    ``recompress``: when a later prefill (a new chat turn, a question) is longer than the window,
    re-select over everything cached plus the new tokens with the new tokens' own window, so the
    cache stays at the budget over turns. ``use_reference``: compress with the plain-torch
    reference (float64) instead of the native op, for debugging. ``decode_reserve``: free entries
    allocated after a compression, for the tokens decoded next.

    ``kernel_size``: the pooling kernel over the votes, 13 by default (chosen by measurement,
    benchmarks/RESULTS.md section 14); the published SnapKV setting is ``kernel_size=7``.

    ``policy``: how the budget is spread over layers and KV heads, a name in
    :data:`snapkv_ext.policies.POLICIES` (``snapkv``, the default: uniform; ``pyramidkv``;
    ``adakv``; ``ada-pyramidkv``) or a policy object (:mod:`snapkv_ext.policies`); stored resolved.

    ``scorer``: how each prompt entry is scored for the selection, a name in
    :data:`snapkv_ext.scorers.SCORERS` (``snapkv``, the default: the window's votes, pooled;
    ``streamingllm``; ``keynorm``; ``tova``; ``vatp``) or a scorer object
    (:mod:`snapkv_ext.scorers`); stored resolved. ``kernel_size``, ``pooling`` and
    ``group_reduce`` are the ``snapkv`` scorer's.

    ``max_capacity_decode``: keep every global layer within this many entries per KV head while
    generating (None, the default: the cache grows by one entry per generated token). When a
    layer holds more than ``max_capacity_decode + decode_interval`` entries, it re-selects down to
    ``max_capacity_decode`` (spread over layers and heads by the policy) with the scorer and the
    last ``window_size`` tokens' queries (generated ones), and frees the rest.

    ``store``: how each global layer holds what it keeps, a name in
    :data:`snapkv_ext.stores.STORES` (``dense``: every KV head at one length; ``ragged``: each
    head its own length, nothing padded) or a store class of one's own; unset (None), the one the
    policy needs (``ragged`` under a per-head policy, else ``dense``); stored resolved.
    """

    # Each setting once: its name, default, type and one line of help (the command line's flags,
    # SnapKVCache's and SnapKVDocument's arguments and the lm-eval model args are checked against
    # these by tests/test_cli.py and tests/test_cache.py).
    max_capacity_prompt: Optional[int] = _setting(
        None, int, "kept prompt entries per KV head, the window included (1024 when no compression ratio is given)")
    window_size: int = _setting(32, int, "the prompt's last tokens, whose attention scores the rest")
    kernel_size: int = _setting(DEFAULT_KERNEL_SIZE, int,
                                "pooling kernel over the scores (odd; SnapKV's published setting: 7)")
    pooling: str = _setting("max", str, "how the scores are pooled: max or avg")
    group_reduce: str = _setting("mean", str, "how a GQA group's query heads' scores combine: mean, max or sum")
    compression_ratio: Optional[float] = _setting(None, float, "fraction of each prompt kept, in (0, 1]")
    recompress: bool = _setting(True, bool, "re-select over the cache and a new turn longer than the window")
    use_reference: bool = _setting(False, bool, "compress with the float64 plain-torch reference (debugging)")
    decode_reserve: int = _setting(128, int, "free entries allocated after a compression, for the tokens decoded next")
    policy: Any = _setting("snapkv", str, "how the budget is spread over layers and KV heads (docs/policies.md)")
    scorer: Any = _setting("snapkv", str, "how entries are scored for the selection (docs/scorers.md)")
    max_capacity_decode: Optional[int] = _setting(
        None, int, "keep each layer within this many entries per KV head while generating (None: no bound)")
    decode_interval: int = _setting(64, int, "with max_capacity_decode: re-select every this many generated tokens")
    store: Any = _setting(None, str, "how each layer holds what it keeps: dense or ragged (each KV head its own "
                                     "length, no padding); unset: what the policy needs (docs/policies.md)")

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"SnapKVConfig: {msg}")

        if not isinstance(self.window_size, int) or self.window_size < 1:
            bad(f"window_size must be a positive integer, got {self.window_size!r}")
        if self.compression_ratio is not None:
            if self.max_capacity_prompt is not None:
                bad("give either max_capacity_prompt or compression_ratio, not both "
                    f"(got {self.max_capacity_prompt!r} and {self.compression_ratio!r})")
            if (not isinstance(self.compression_ratio, (int, float)) or isinstance(self.compression_ratio, bool)
                    or not 0 < self.compression_ratio <= 1):
                bad(f"compression_ratio must be in (0, 1], got {self.compression_ratio!r}")
        else:
            if self.max_capacity_prompt is None:
                object.__setattr__(self, "max_capacity_prompt", DEFAULT_MAX_CAPACITY_PROMPT)
            if (not isinstance(self.max_capacity_prompt, int) or isinstance(self.max_capacity_prompt, bool)
                    or self.max_capacity_prompt <= self.window_size):
                bad(f"max_capacity_prompt must be an integer larger than window_size ({self.window_size}), "
                    f"got {self.max_capacity_prompt!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            bad(f"kernel_size must be a positive odd integer, got {self.kernel_size!r}")
        if self.pooling not in POOLINGS:
            bad(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.group_reduce not in GROUP_REDUCES:
            bad(f"group_reduce must be one of {GROUP_REDUCES}, got {self.group_reduce!r}")
        if not isinstance(self.decode_reserve, int) or self.decode_reserve < 0:
            bad(f"decode_reserve must be a non-negative integer, got {self.decode_reserve!r}")
        if self.max_capacity_decode is not None and (
                not isinstance(self.max_capacity_decode, int) or isinstance(self.max_capacity_decode, bool)
                or self.max_capacity_decode <= self.window_size):
            bad(f"max_capacity_decode must be None or an integer larger than window_size ({self.window_size}), "
                f"got {self.max_capacity_decode!r}")
        if not isinstance(self.decode_interval, int) or isinstance(self.decode_interval, bool) or self.decode_interval < 1:
            bad(f"decode_interval must be a positive integer, got {self.decode_interval!r}")
        from . import stores
        from .policies import resolve
        from .scorers import resolve as resolve_scorer

        try:
            object.__setattr__(self, "policy", resolve(self.policy))
            object.__setattr__(self, "scorer", resolve_scorer(self.scorer))
            object.__setattr__(self, "store", stores.resolve(self.store, self.policy))
        except ValueError as e:
            bad(str(e))

    def to_dict(self) -> dict:
        """The settings as plain (JSON-able) data: a built-in policy or scorer as
        ``{"name": ..., **params}`` (:func:`snapkv_ext.policies.describe`,
        :func:`snapkv_ext.scorers.describe`), one of one's own as its ``repr``."""
        from dataclasses import asdict

        from . import scorers, stores
        from .policies import POLICIES, describe

        p, s = self.policy, self.scorer
        return dict(asdict(self), policy=describe(p) if type(p) in POLICIES.values() else repr(p),
                    scorer=scorers.describe(s) if type(s) in scorers.SCORERS.values() else repr(s),
                    store=stores.name(self.store))

    @property
    def one_layout(self) -> bool:
        """Whether every global layer holds one length for all its KV heads and rows, the same in
        each layer (the uniform policy on the dense store): what one 2D attention mask describes."""
        from .policies import SelectionPolicy
        from .stores import layer_class

        return type(self.policy) is SelectionPolicy and not layer_class(self.store).per_head

    @property
    def reserve(self) -> int:
        """Free entries allocated after a selection: ``decode_reserve``, and with a decode budget at
        least ``decode_interval`` (the entries decoded before the next re-selection)."""
        return self.decode_reserve if self.max_capacity_decode is None else max(self.decode_reserve,
                                                                                self.decode_interval)

    def max_capacity_prompt_for(self, prompt_length: int) -> int:
        """Kept entries per KV head for a prompt of ``prompt_length`` tokens (window included)."""
        if self.compression_ratio is None:
            return self.max_capacity_prompt
        return max(self.window_size + 1, math.ceil(self.compression_ratio * prompt_length))
