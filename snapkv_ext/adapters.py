"""Model families: everything the cache knows about a model's attention, in one table.

SnapKV must score the prompt with the attention the model itself computes. For each family this
file says how its attention modules compute their queries (projection, query norm, rotary), and
reads from each module the logit transform it applies (``module.scaling``; Gemma's
``attn_logit_softcapping``) and whether the layer slides over a window. The cache holds nothing
model-specific; adding an architecture is one :class:`Family` entry in ``FAMILIES`` plus one
test config (``snapkv_ext.tools.models.TINY_CONFIGS``); see README "Adding an architecture".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

README_SECTION = "README.md, 'Adding an architecture'"


@dataclass(frozen=True)
class Family:
    """How one family's attention modules compute their queries.

    projection : "q_proj", or "qkv_proj" (one fused projection; the queries are its first
        ``num_attention_heads * head_dim`` outputs, as in Phi-3).
    query_norm : None, "head" (``q_norm`` over each head's ``head_dim`` values: Qwen3, Gemma 3)
        or "projection" (``q_norm`` over the whole projection, before the heads are split: OLMo 2).
    sliding_window : where a layer's sliding window is read: None (never slides), "module"
        (``module.sliding_window``, None on global layers: Qwen2, Gemma) or "config"
        (``module.config.sliding_window`` on every layer: Mistral, Mixtral, Phi-3).
    """

    name: str
    attention: Tuple[str, ...]
    projection: str = "q_proj"
    query_norm: Optional[str] = None
    sliding_window: Optional[str] = None


FAMILIES: Tuple[Family, ...] = (
    Family("llama", ("LlamaAttention",)),  # also SmolLM2
    Family("mistral", ("MistralAttention",), sliding_window="config"),
    Family("mixtral", ("MixtralAttention",), sliding_window="config"),
    Family("qwen2", ("Qwen2Attention",), sliding_window="module"),
    Family("qwen2_moe", ("Qwen2MoeAttention",), sliding_window="module"),
    Family("qwen3", ("Qwen3Attention",), query_norm="head", sliding_window="module"),
    Family("qwen3_moe", ("Qwen3MoeAttention",), query_norm="head", sliding_window="module"),
    Family("gemma2", ("Gemma2Attention",), sliding_window="module"),  # scaling from query_pre_attn_scalar, soft-cap
    Family("gemma3", ("Gemma3Attention",), query_norm="head", sliding_window="module"),
    Family("phi3", ("Phi3Attention",), projection="qkv_proj", sliding_window="config"),
    Family("granite", ("GraniteAttention",)),  # scaling = attention_multiplier
    Family("olmo2", ("Olmo2Attention",), query_norm="projection"),
)
_BY_CLASS = {cls: fam for fam in FAMILIES for cls in fam.attention}


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``q [B, H, n, D]`` with ``cos``/``sin`` ``[B, n, R]`` (R <= D: a partial
    rotary rotates the first R dims and passes the rest), as every family here applies it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return (q * cos) + (_rotate_half(q) * sin)
    q_rot, q_pass = q[..., :r], q[..., r:]
    return torch.cat(((q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass), dim=-1)


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One attention module as the cache sees it: its family, its logit transform
    ``softcap * tanh(scale * q.k / softcap)`` (no cap when ``softcap`` is None) and its sliding
    window (None on a global layer)."""

    module: torch.nn.Module
    family: Family
    layer_idx: int
    scale: float
    softcap: Optional[float]
    sliding_window: Optional[int]

    def window_queries(self, hidden_states: Tensor, position_embeddings, w: int) -> Tensor:
        """The post-RoPE (post-norm) queries ``[B, H_q, w, D]`` of the last ``w`` tokens of
        ``hidden_states [B, n, hidden]`` (the attention module's input), computed as the module
        computes its queries."""
        m, fam = self.module, self.family
        hs = hidden_states[:, -w:]
        B, n = hs.shape[:2]
        if fam.projection == "qkv_proj":
            q = m.qkv_proj(hs)[..., : m.config.num_attention_heads * m.head_dim]
        else:
            q = m.q_proj(hs)
        if fam.query_norm == "projection":
            q = m.q_norm(q)
        q = q.view(B, n, -1, m.head_dim)
        if fam.query_norm == "head":
            q = m.q_norm(q)
        cos, sin = position_embeddings
        return apply_rotary(q.transpose(1, 2), cos[:, -w:], sin[:, -w:])


def unsupported(model_name: str, what: str) -> ValueError:
    return ValueError(f"SnapKVCache does not support {model_name}: {what}; supported attention classes: "
                      f"{', '.join(sorted(_BY_CLASS))} (see {README_SECTION})")


def _sliding_window(module: torch.nn.Module, fam: Family) -> Optional[int]:
    if fam.sliding_window == "module":
        window = getattr(module, "sliding_window", None)
    elif fam.sliding_window == "config":
        window = getattr(module.config, "sliding_window", None)
    else:
        window = None
    if window is not None and (not isinstance(window, int) or window < 2):
        raise ValueError(f"layer {module.layer_idx}: sliding_window must be an integer >= 2, got {window!r}")
    return window


def attention_layers(model: torch.nn.Module) -> List[AttentionLayer]:
    """Every attention module of ``model`` in layer order, or ValueError naming the first
    unsupported attention class."""
    name = type(model).__name__
    mods = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not mods:
        raise unsupported(name, "no attention modules with a layer_idx found")
    layers = []
    for m in mods:
        cls = type(m).__name__
        fam = _BY_CLASS.get(cls)
        if fam is None:
            raise unsupported(name, f"attention class {cls}")
        if not getattr(m, "is_causal", True):
            raise unsupported(name, f"{cls} in layer {m.layer_idx} is bidirectional")
        if getattr(m, "sinks", None) is not None:
            raise unsupported(name, f"{cls} in layer {m.layer_idx} has attention sinks")
        softcap = getattr(m, "attn_logit_softcapping", None)
        layers.append(AttentionLayer(m, fam, m.layer_idx, float(m.scaling),
                                     None if softcap is None else float(softcap), _sliding_window(m, fam)))
    layers.sort(key=lambda a: a.layer_idx)
    if [a.layer_idx for a in layers] != list(range(len(layers))):
        raise unsupported(name, f"its attention layers are numbered {[a.layer_idx for a in layers]}, not 0..n-1")
    return layers


def decoder_layers(model: torch.nn.Module, attention: Optional[List[AttentionLayer]] = None) -> torch.nn.ModuleList:
    """The ``ModuleList`` of decoder layers: the i-th holds the attention module of layer i (every
    family here: ``model.model.layers``, found by structure, not by name)."""
    attention = attention_layers(model) if attention is None else attention
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == len(attention) and all(
                any(sub is a.module for sub in layer.modules()) for layer, a in zip(m, attention)):
            return m
    raise unsupported(type(model).__name__, "no list of decoder layers holding its attention modules in order")
