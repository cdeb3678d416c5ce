"""SnapKV as an lm-evaluation-harness model type: ``snapkv`` (lm-eval 0.4.13, an optional extra).

    pip install 'snapkv-ext[lm-eval]'
    python -m snapkv_ext.lm_eval --model snapkv \\
        --model_args pretrained=smollm2,compression_ratio=0.25,window_size=32 \\
        --tasks niah_single_1 ruler_vt --limit 5 --device cpu

or from Python::

    import snapkv_ext.lm_eval                    # registers "snapkv" in lm-eval's model registry
    from lm_eval import simple_evaluate
    from snapkv_ext.lm_eval import SnapKVLM, ruler_metadata
    lm = SnapKVLM(pretrained="smollm2", compression_ratio=0.25)
    res = simple_evaluate(model=lm, tasks=["niah_single_1"], limit=5, metadata=ruler_metadata(lm, [4096]))

``SnapKVLM`` is lm-eval's Hugging Face model (``HFLM``) whose ``generate`` gets a fresh
:class:`~snapkv_ext.SnapKVCache` per batch: every generation task runs with SnapKV.

Model args (``--model_args k=v,...``), beside HFLM's own (``dtype``, ``device``, ``batch_size``,
``max_length``, ``gguf_file``, ``tokenizer``, ...):

- ``pretrained``: a local model directory (with ``gguf_file=`` for a GGUF file in it), or
  ``smollm2`` (the default: the embedded SmolLM2-135M-Instruct GGUF). Nothing is downloaded.
- The cache settings, by :class:`~snapkv_ext.SnapKVConfig`'s names: ``max_capacity_prompt`` or
  ``compression_ratio``, ``window_size``, ``kernel_size``, ``pooling``, ``group_reduce``,
  ``recompress``, ``use_reference``, ``decode_reserve``, ``policy``, ``scorer``.
- ``full_cache=true``: Transformers' own full cache instead (the uncompressed baseline).
- ``likelihood``: ``refuse`` (default) or ``full``. Likelihood requests (``loglikelihood``,
  ``loglikelihood_rolling``: multiple-choice and perplexity tasks) are scored by lm-eval in one
  forward over context and continuation, which builds no cache: there is no prompt KV to
  compress, so SnapKV cannot change them. By default they are refused (an error naming the
  task), so that an uncompressed score is never reported as a SnapKV one; ``likelihood=full``
  scores them with the full attention, as the plain ``hf`` model does.

A bad model arg (unknown name, or a value :class:`~snapkv_ext.SnapKVConfig` refuses) raises
:class:`ModelArgError` (a ``ValueError``), one line naming the arg; the command line prints it
and exits with status 2.

RULER's synthetic tasks build their data with a tokenizer they load by name (the ``tokenizer``
model arg or metadata, else ``pretrained``). A GGUF model has no tokenizer directory, so the
model saves its tokenizer to a cache folder (``lm.tokenizer_dir``; ``$SNAPKV_CACHE_DIR``, default
``~/.cache/snapkv-ext``); ``python -m snapkv_ext.lm_eval`` passes it to the tasks by itself, and
:func:`ruler_metadata` does it for the Python API.

lm-eval's own command line does not discover third-party model types, hence
``python -m snapkv_ext.lm_eval``: it takes lm-eval's own flags (``--model`` defaults to
``snapkv``). This module is the only one in the package that imports ``lm_eval``.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError("snapkv_ext.lm_eval needs lm-eval: pip install 'snapkv-ext[lm-eval]'") from e

import torch

from .config import SnapKVConfig

EMBEDDED = "smollm2"
LIKELIHOOD_MODES = ("refuse", "full")
# The cache settings, by SnapKVConfig's names (every field: new policies join automatically).
SNAPKV_ARGS = tuple(SnapKVConfig.__dataclass_fields__)
OWN_ARGS = SNAPKV_ARGS + ("full_cache", "likelihood")
# Beside HFLM's named arguments, what HFLM forwards to from_pretrained that is commonly given.
_FROM_PRETRAINED_ARGS = ("attn_implementation", "device_map", "low_cpu_mem_usage", "load_in_8bit", "load_in_4bit",
                         "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")

log = logging.getLogger(__name__)


class ModelArgError(ValueError):
    """A model arg the user can fix: one line naming it."""


def _hflm_args() -> List[str]:
    params = inspect.signature(HFLM.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def accepted_args() -> List[str]:
    """Every model arg the ``snapkv`` model type takes."""
    return sorted(set(OWN_ARGS) | set(_hflm_args()) | set(_FROM_PRETRAINED_ARGS))


# ---------------------------------------------------------------- tokenizer folder for RULER


def resolve_pretrained(pretrained, gguf_file: Optional[str] = None):
    """(pretrained, gguf_file) with ``smollm2`` (or None) replaced by the embedded model's folder and file."""
    if pretrained is None or (isinstance(pretrained, str) and pretrained.lower() == EMBEDDED):
        from .tools.models import GGUF_FILE, smollm2_dir

        return smollm2_dir(), gguf_file or GGUF_FILE
    return pretrained, gguf_file


def tokenizer_dir_for(pretrained, gguf_file: Optional[str] = None) -> Optional[str]:
    """The folder a RULER task can load the model's tokenizer from: the model folder itself, or
    for a GGUF model the cache folder :class:`SnapKVLM` saves its tokenizer to. None if unknown."""
    pretrained, gguf_file = resolve_pretrained(pretrained, gguf_file)
    if not isinstance(pretrained, str):
        return None
    if not gguf_file:
        return pretrained
    from .tools.models import cache_root, gguf_cache_name

    return os.path.join(cache_root(), "tokenizers", gguf_cache_name(pretrained, gguf_file))


def save_tokenizer(tokenizer, path: str) -> str:
    """Save ``tokenizer`` to ``path`` once (atomically: other processes see all of it or nothing)."""
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tok-", dir=parent)
    try:
        tokenizer.save_pretrained(tmp)
        try:
            os.chmod(tmp, 0o755)
            os.rename(tmp, path)
        except OSError:  # another process got there first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def ruler_metadata(lm: "SnapKVLM", lengths: Sequence[int] = (4096,)) -> Dict[str, object]:
    """``metadata=`` for ``simple_evaluate`` / ``TaskManager`` with RULER tasks: the tokenizer
    folder of ``lm`` and the sequence lengths."""
    if lm.tokenizer_dir is None:
        raise ValueError("this model has no tokenizer folder: pass tokenizer=<folder> in the model args")
    return {"tokenizer": lm.tokenizer_dir, "max_seq_lengths": [int(n) for n in lengths]}


# ---------------------------------------------------------------- the model type


def _bool_arg(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ModelArgError(f"{name} must be true or false, got {value!r}")


def _default_device(device: Optional[str]) -> str:
    # lm-eval's command line passes cuda:0 by default; like HFLM, fall back to the CPU without a GPU.
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def check_model_args(model_args: Dict[str, object]):
    """Validate the ``snapkv`` model args without loading anything: ``(full_cache, likelihood,
    SnapKVConfig or None, the remaining args for HFLM)``; :class:`ModelArgError` names a bad one."""
    kwargs = dict(model_args)
    known = set(accepted_args())
    for name in kwargs:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ModelArgError(f"unknown model arg {name!r}{hint}")
    full_cache = _bool_arg("full_cache", kwargs.pop("full_cache", False))
    likelihood = kwargs.pop("likelihood", "refuse")
    if likelihood not in LIKELIHOOD_MODES:
        raise ModelArgError(f"likelihood must be one of {LIKELIHOOD_MODES}, got {likelihood!r}")
    settings = {k: kwargs.pop(k) for k in SNAPKV_ARGS if k in kwargs}
    for k in ("recompress", "use_reference"):
        if k in settings:
            settings[k] = _bool_arg(k, settings[k])
    if full_cache:
        if settings:
            raise ModelArgError(f"full_cache=true takes no SnapKV settings (got {', '.join(sorted(settings))})")
        config = None
    else:
        try:
            config = SnapKVConfig(**settings)
        except ValueError as e:
            raise ModelArgError(str(e).removeprefix("SnapKVConfig: ")) from None
    pretrained = kwargs.get("pretrained", EMBEDDED)
    if pretrained is None:
        kwargs["pretrained"] = pretrained = EMBEDDED
    gguf_file = kwargs.get("gguf_file")
    if isinstance(pretrained, str):
        if pretrained.lower() != EMBEDDED and not os.path.isdir(pretrained):
            raise ModelArgError(f"pretrained={pretrained}: not a local directory (give a model folder, with "
                                "gguf_file= for a GGUF file in it, or pretrained=smollm2; nothing is downloaded)")
        if gguf_file and pretrained.lower() != EMBEDDED and not os.path.isfile(os.path.join(pretrained, gguf_file)):
            raise ModelArgError(f"gguf_file={gguf_file}: not found in {pretrained}")
    elif gguf_file:
        raise ModelArgError("gguf_file needs pretrained=<folder holding the file>")
    return full_cache, likelihood, config, kwargs


@register_model("snapkv")
class SnapKVLM(HFLM):
    """lm-eval's Hugging Face model with a :class:`~snapkv_ext.SnapKVCache` in every ``generate``.

    See the module docstring for the model args. ``snapkv_config`` (None with ``full_cache``) is
    the :class:`~snapkv_ext.SnapKVConfig` every cache is built with; ``last_cache`` the cache of
    the latest batch; ``cache_log`` one record per batch (prompt tokens, KV bytes held and what
    the full cache would hold)."""

    def __init__(self, pretrained=EMBEDDED, *, full_cache=False, likelihood: str = "refuse", device=None,
                 dtype="auto", **kwargs):
        self.full_cache, self.likelihood, self.snapkv_config, kwargs = check_model_args(
            dict(kwargs, pretrained=pretrained, full_cache=full_cache, likelihood=likelihood))
        pretrained = kwargs.pop("pretrained")
        gguf_file = kwargs.pop("gguf_file", None)
        if isinstance(pretrained, str):
            pretrained, gguf_file = resolve_pretrained(pretrained, gguf_file)
        device = _default_device(device)
        if dtype in (None, "auto") and isinstance(pretrained, str):
            # float32 on the CPU (GGUF weights come dequantized), bfloat16 on a GPU.
            dtype = "float32" if device == "cpu" else "bfloat16"
        kwargs.setdefault("attn_implementation", "sdpa")
        if not isinstance(pretrained, str):
            kwargs.pop("attn_implementation")
        load_from, load_gguf = pretrained, gguf_file
        if gguf_file and isinstance(pretrained, str):
            # Read the float32 copy of the GGUF model (made now if missing): 0.4 s instead of
            # dequantizing the file again (the embedded model: 23 s). See tools.models.load_model.
            from .tools.models import gguf_copy

            load_from = gguf_copy(pretrained, gguf_file, dtype)
            load_gguf = None if load_from != pretrained else gguf_file
        super().__init__(pretrained=load_from, device=device, dtype=dtype, gguf_file=load_gguf, **kwargs)

        from .cache import SnapKVCache

        if self.snapkv_config is not None:
            try:  # refuse an unsupported architecture now, not after the data is built
                SnapKVCache(self.model, config=self.snapkv_config)
            except ValueError as e:
                raise ModelArgError(f"pretrained: {e}") from None
        self.last_cache = None
        self.cache_log: List[Dict[str, int]] = []
        self.on_batch: Optional[Callable[[int], None]] = None  # called with each batch's size (progress)
        self.show_progress = True  # lm-eval's own bar over the generation requests
        tok = kwargs.get("tokenizer")
        if isinstance(tok, str):
            self.tokenizer_dir: Optional[str] = tok
        elif isinstance(pretrained, str):
            self.tokenizer_dir = tokenizer_dir_for(pretrained, gguf_file)
            if gguf_file and self.tokenizer_dir:
                save_tokenizer(self.tokenizer, self.tokenizer_dir)
        else:
            self.tokenizer_dir = None

    # -- settings
    @property
    def setting_name(self) -> str:
        """``full``, or the policy and the budget: ``snapkv-25%``, ``adakv-1024``; with another scorer
        than SnapKV's, it first: ``tova+snapkv-25%``."""
        c = self.snapkv_config
        if c is None:
            return "full"
        scorer = getattr(c.scorer, "name", type(c.scorer).__name__)
        name = c.policy.name if scorer == "snapkv" else f"{scorer}+{c.policy.name}"
        if c.compression_ratio is not None:
            return f"{name}-{c.compression_ratio * 100:g}%"
        return f"{name}-{c.max_capacity_prompt}"

    def set_cache(self, config: Optional[SnapKVConfig]) -> None:
        """Switch the cache every later ``generate`` uses: a :class:`SnapKVConfig`, or None for the full cache."""
        if config is not None and not isinstance(config, SnapKVConfig):
            raise TypeError(f"config must be a SnapKVConfig or None, got {type(config).__name__}")
        self.snapkv_config = config
        self.full_cache = config is None

    def make_cache(self):
        from transformers import DynamicCache

        from .cache import SnapKVCache

        if self.snapkv_config is None:  # what generate() builds itself (sliding layers for sliding models)
            return DynamicCache(config=self.model.config)
        return SnapKVCache(self.model, config=self.snapkv_config)

    # -- generation: every batch gets its own cache
    def _model_generate(self, context, max_length: int, stop: List[str], **generation_kwargs) -> torch.Tensor:
        from .cache import SnapKVCache, cache_kwargs

        for name in ("past_key_values", "cache"):
            if name in generation_kwargs:
                raise ModelArgError(f"gen_kwargs {name}: the snapkv model type builds the cache itself")
        cache = self.make_cache()
        self.last_cache = cache
        out = super()._model_generate(context, max_length, stop, **generation_kwargs, **cache_kwargs(self.model, cache))
        if isinstance(cache, SnapKVCache):
            s = cache.stats()
            self.cache_log.append(dict(prompt_tokens=int(context.shape[1]), kv_bytes=s["kv_bytes"],
                                       full_kv_bytes=s["full_kv_bytes"]))
        else:
            held = sum(2 * lay.keys.numel() * lay.keys.element_size() for lay in cache.layers
                       if getattr(lay, "keys", None) is not None)
            self.cache_log.append(dict(prompt_tokens=int(context.shape[1]), kv_bytes=held, full_kv_bytes=held))
        if self.on_batch is not None:
            self.on_batch(int(context.shape[0]))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    # -- likelihood requests: no cache is built, so nothing to compress
    def _likelihood_allowed(self, requests, kind: str) -> None:
        if self.full_cache or self.likelihood == "full" or not requests:
            return
        tasks = sorted({getattr(r, "task_name", None) or "?" for r in requests})
        raise ModelArgError(
            f"{kind} requests (task {', '.join(tasks)}) are refused: lm-eval scores them in one forward over "
            "context and continuation, which builds no KV cache, so SnapKV would not change the score; "
            "pass likelihood=full to score them with the full attention (the plain model's numbers)")

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._likelihood_allowed(requests, "loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._likelihood_allowed(requests, "loglikelihood_rolling")
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        # HFLM's asks the Hub for the model's SHA: never here.
        info = {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(getattr(self.model, "dtype", "")), "cache": self.setting_name}
        if self.snapkv_config is not None:
            info["snapkv_config"] = self.snapkv_config.to_dict()
        return info


# ---------------------------------------------------------------- python -m snapkv_ext.lm_eval


def _add_tokenizer_metadata(args) -> None:
    """RULER tasks load the tokenizer by name: point them at the GGUF model's saved tokenizer."""
    model_args = dict(args.model_args or {})
    metadata = dict(args.metadata or {})
    if "tokenizer" in model_args or "tokenizer" in metadata:
        return
    pretrained = model_args.get("pretrained", EMBEDDED)
    gguf_file = model_args.get("gguf_file")
    if not (isinstance(pretrained, str) and (pretrained.lower() == EMBEDDED or gguf_file)):
        return  # a model folder: RULER falls back to pretrained, which has the tokenizer
    if isinstance(pretrained, str) and pretrained.lower() != EMBEDDED and not os.path.isdir(pretrained):
        return  # the model reports the bad folder
    path = tokenizer_dir_for(pretrained, gguf_file)
    if path:
        metadata["tokenizer"] = path  # SnapKVLM saves it there before the tasks build their data
        args.metadata = metadata


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m snapkv_ext.lm_eval [lm-eval's flags]``: lm-eval's command line, with the
    ``snapkv`` model type registered (and the default ``--model``)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["python -m snapkv_ext.lm_eval"] + argv
    try:
        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "command", None) == "run":
        if not args.model:
            args.model = "snapkv"
        if args.model == "snapkv":
            try:  # before lm-eval indexes its tasks and loads the model
                check_model_args(args.model_args or {})
            except ModelArgError as e:
                print(f"snapkv_ext.lm_eval: error: {e}", file=sys.stderr)
                return 2
            _add_tokenizer_metadata(args)
    try:
        cli.execute(args)
    except ModelArgError as e:
        print(f"snapkv_ext.lm_eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
