"""Model families: everything the cache knows about a model's attention, in one table.

SnapKV must score the prompt with the attention the model itself computes. For each family this
file says how its attention modules compute their queries (projection, query norm, rotary), and
reads from each module the logit transform it applies (``module.scaling``; Gemma's
``attn_logit_softcapping``) and whether the layer slides over a window. The cache holds nothing
model-specific; adding an architecture is one :class:`Family` entry in ``FAMILIES`` plus one
test config (``snapkv_ext.tools.models.TINY_CONFIGS``); see docs/extending.md.

Tensor parallelism (Transformers' ``tp_plan``): each process's attention computes its own share
of the heads, and the cache keeps that share; :func:`attention_layers` says how many heads each
module computes on this process and refuses, in one line, a sharding that splits a KV head or a
GQA group (docs/scaling-out.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

EXTENDING_DOC = "docs/extending.md"


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


def describe_sharding(tp_size: int) -> str:
    return "not sharded" if tp_size == 1 else f"sharded over {tp_size} tensor-parallel processes"


def tensor_parallel_size(module: torch.nn.Module) -> int:
    """Processes the module's weights are sharded over (DTensors on a device mesh), 1 if none."""
    for p in module.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            return mesh.size()
    return 1


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One attention module as the cache sees it: its family, its logit transform
    ``softcap * tanh(scale * q.k / softcap)`` (no cap when ``softcap`` is None), its sliding
    window (None on a global layer), and the heads it computes on this process: all of the
    model's, or this process's share under tensor parallelism (``tp_size`` processes)."""

    module: torch.nn.Module
    family: Family
    layer_idx: int
    scale: float
    softcap: Optional[float]
    sliding_window: Optional[int]
    q_heads: int
    kv_heads: int
    tp_size: int

    def _changed(self, what: str, got) -> ValueError:
        return ValueError(f"SnapKVCache: layer {self.layer_idx} computes {got} {what} heads on this process, but the "
                          f"cache was built for {self.q_heads if what == 'query' else self.kv_heads} (its model "
                          f"{describe_sharding(self.tp_size)}); create the cache from the model it runs with, on every "
                          "process, after the model is sharded")

    def check_kv_heads(self, n: int) -> None:
        """Refuse keys ``[B, n, L, D]`` with another head count than this process's share."""
        if n != self.kv_heads:
            raise self._changed("KV", n)

    def window_queries(self, hidden_states: Tensor, position_embeddings, w: int) -> Tensor:
        """The post-RoPE (post-norm) queries ``[B, H_q, w, D]`` of the last ``w`` tokens of
        ``hidden_states [B, n, hidden]`` (the attention module's input), computed as the module
        computes its queries."""
        m, fam = self.module, self.family
        hs = hidden_states[:, -w:]
        B, n = hs.shape[:2]
        if fam.projection == "qkv_proj":
            q = m.qkv_proj(hs)[..., : self.q_heads * m.head_dim]
        else:
            q = m.q_proj(hs)
        if q.shape[-1] != self.q_heads * m.head_dim:
            raise self._changed("query", f"{q.shape[-1] / m.head_dim:g}")
        if fam.query_norm == "projection":
            q = m.q_norm(q)
        q = q.view(B, n, -1, m.head_dim)
        if fam.query_norm == "head":
            q = m.q_norm(q)
        cos, sin = position_embeddings
        return apply_rotary(q.transpose(1, 2), cos[:, -w:], sin[:, -w:])


def unsupported(model_name: str, what: str) -> ValueError:
    return ValueError(f"SnapKVCache does not support {model_name}: {what}; supported attention classes: "
                      f"{', '.join(sorted(_BY_CLASS))} (see {EXTENDING_DOC})")


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


def _sharded_output(plan: dict, module_name: str, projection: str) -> bool:
    """Whether Transformers' tensor-parallel plan leaves ``projection``'s output split over the
    processes ("colwise": each computes its share of the heads) rather than gathered (the rule
    Transformers itself applies to size a cache per process)."""
    pattern = re.sub(r"\.\d+(?=\.|$)", ".*", f"{module_name}.{projection}")
    return any(style == "colwise" and re.sub(r"\.\d+(?=\.|$)", ".*", key) == pattern for key, style in plan.items())


def _heads_on_this_process(model, name: str, m: torch.nn.Module, fam: Family, tp: int) -> Tuple[int, int]:
    """(query heads, KV heads) the module computes on this process: its share of the model's when
    the plan splits its projections over ``tp`` processes, else all of them. One line (ValueError)
    when the split would cut a KV head or a GQA group, which SnapKV keeps whole per process."""
    heads = m.config.num_attention_heads
    kv = getattr(m.config, "num_key_value_heads", None) or heads
    if tp == 1:
        return heads, kv
    plan = getattr(model, "tp_plan", None) or {}
    projections = ("qkv_proj", "qkv_proj") if fam.projection == "qkv_proj" else ("q_proj", "k_proj")
    q_split, kv_split = (_sharded_output(plan, name, p) for p in projections)
    where = f"{type(model).__name__} is sharded over {tp} tensor-parallel processes, but layer {m.layer_idx}"
    if q_split != kv_split:
        raise ValueError(f"SnapKVCache: {where}'s plan splits its {'query' if q_split else 'KV'} heads over them and "
                         f"not its {'KV' if q_split else 'query'} heads: SnapKV scores each KV head with its whole "
                         f"GQA group of query heads on one process; shard {projections[0]} and {projections[1]} alike")
    if kv_split and kv % tp:
        raise ValueError(f"SnapKVCache: {where}'s {kv} KV heads do not divide over them: SnapKV keeps whole KV heads "
                         f"(each with its GQA group) on one process; use a number of processes that divides "
                         f"num_key_value_heads ({kv})")
    return (heads // tp, kv // tp) if kv_split else (heads, kv)


def attention_layers(model: torch.nn.Module) -> List[AttentionLayer]:
    """Every attention module of ``model`` in layer order, or ValueError naming the first
    unsupported attention class, a tensor-parallel sharding that splits KV heads, or pipeline
    parallelism."""
    name = type(model).__name__
    stages = getattr(getattr(getattr(model, "config", None), "distributed_config", None), "pp_size", None) or 1
    if stages > 1:
        raise ValueError(f"SnapKVCache does not support pipeline parallelism ({name} is split over {stages} pipeline "
                         "stages, each holding only its own layers); use tensor parallelism or a device_map "
                         "(docs/scaling-out.md)")
    mods = [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not mods:
        raise unsupported(name, "no attention modules with a layer_idx found")
    tp = getattr(model, "tp_size", None) or 1
    layers = []
    for module_name, m in mods:
        cls = type(m).__name__
        fam = _BY_CLASS.get(cls)
        if fam is None:
            raise unsupported(name, f"attention class {cls}")
        if not getattr(m, "is_causal", True):
            raise unsupported(name, f"{cls} in layer {m.layer_idx} is bidirectional")
        if getattr(m, "sinks", None) is not None:
            raise unsupported(name, f"{cls} in layer {m.layer_idx} has attention sinks")
        softcap = getattr(m, "attn_logit_softcapping", None)
        q_heads, kv_heads = _heads_on_this_process(model, module_name, m, fam, tp)
        layers.append(AttentionLayer(m, fam, m.layer_idx, float(m.scaling),
                                     None if softcap is None else float(softcap), _sliding_window(m, fam),
                                     q_heads, kv_heads, tensor_parallel_size(m)))
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
