"""Generation with timing and progress, the needle-in-a-haystack evaluation and the decoding
benchmark behind the `snapkv-ext` command line, with their plots."""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..cache import SnapKVCache, cache_kwargs
from ..config import DEFAULT_KERNEL_SIZE, SnapKVConfig
from .haystack import chat_ids, needle_case, retrieved


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# SnapKVConfig's settings and their defaults (declared once, in snapkv_ext/config.py).
_SETTINGS = {f.name: f.default for f in fields(SnapKVConfig)}


class Method:
    """A cache to compare: the full DynamicCache (:meth:`full`), or SnapKV with any settings of
    :class:`snapkv_ext.SnapKVConfig` as keywords (their names and defaults are that class's):
    ``Method("adakv-10%", compression_ratio=0.1, policy="adakv")``. A setting reads as an
    attribute (``method.window_size``), its config default where not given."""

    def __init__(self, name: str, **settings):
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"Method {name!r}: no SnapKVConfig setting {', '.join(unknown)} "
                            f"(the settings: {', '.join(_SETTINGS)})")
        self.name = name
        self.settings = settings

    def __getattr__(self, key: str):
        if key in _SETTINGS:
            return self.__dict__.get("settings", {}).get(key, _SETTINGS[key])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __repr__(self) -> str:
        return f"Method({self.name!r}{''.join(f', {k}={v!r}' for k, v in self.settings.items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Method) and (self.name, self.settings) == (other.name, other.settings)

    __hash__ = None

    @staticmethod
    def full() -> "Method":
        return Method("full")

    @property
    def is_full(self) -> bool:
        return self.max_capacity_prompt is None and self.compression_ratio is None

    def config(self, prompt_len: int) -> SnapKVConfig:
        """The SnapKV settings for a prompt of ``prompt_len`` tokens (the window shrunk below a small budget)."""
        window_size = min(self.window_size, max(1, (self.max_capacity_prompt or prompt_len) - 1))
        return SnapKVConfig(**{**self.settings, "window_size": window_size})

    def compresses(self, prompt_len: int) -> bool:
        """Whether a prompt of ``prompt_len`` tokens is compressed (the full cache never is; SnapKV
        keeps the whole prompt when it fits the budget)."""
        return not self.is_full and self.config(prompt_len).max_capacity_prompt_for(prompt_len) < prompt_len

    def make_cache(self, model, prompt_len: int):
        from transformers import DynamicCache

        if self.is_full:
            return DynamicCache()
        return SnapKVCache(model, config=self.config(prompt_len))


def parse_methods(max_capacity_prompts: Sequence[int] = (), compression_ratios: Sequence[float] = (),
                  window_size: int = 32, kernel_size: int = DEFAULT_KERNEL_SIZE, pooling: str = "max",
                  policies: Sequence[str] = ("snapkv",), scorers: Sequence[str] = ("snapkv",)) -> List[Method]:
    """The full cache, then per scorer and policy (named ``<policy>-<budget>`` for SnapKV's scorer:
    ``snapkv-256``, ``adakv-10%``; ``<scorer>+<policy>-<budget>`` for another: ``tova+snapkv-256``)
    each budget."""
    kw = dict(window_size=window_size, kernel_size=kernel_size, pooling=pooling)
    methods = [Method.full()]
    for s in scorers:
        for p in policies:
            name = p if s == "snapkv" else f"{s}+{p}"
            methods += [Method(f"{name}-{c}", max_capacity_prompt=c, policy=p, scorer=s, **kw)
                        for c in max_capacity_prompts]
            methods += [Method(f"{name}-{int(round(r * 100))}%", compression_ratio=r, policy=p, scorer=s, **kw)
                        for r in compression_ratios]
    return methods


@dataclass
class GenerationResult:
    text: str
    tokens: List[int]
    prefill_s: float
    decode_tokens_per_s: float
    kv_bytes: int
    full_kv_bytes: int
    prompt_tokens: int
    extra: Dict = field(default_factory=dict)

    @property
    def kv_reduction(self) -> float:
        return self.full_kv_bytes / self.kv_bytes if self.kv_bytes else 1.0


def cache_bytes(cache) -> int:
    if isinstance(cache, SnapKVCache):
        return cache.stats()["kv_bytes"]
    return sum(2 * lay.keys.numel() * lay.keys.element_size() for lay in cache.layers if lay.keys is not None)


@contextlib.contextmanager
def _layer_progress(model, callback: Optional[Callable[[], None]]):
    """Calls `callback` after each decoder layer's forward (prefill progress), then removes the hooks."""
    handles = []
    if callback is not None:
        layers = getattr(getattr(model, "model", model), "layers", [])
        def hook(*_):
            callback()  # returns None: a forward hook's return value would replace the output

        handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _prefill_layer_major(model, ids, cache, chunk_size: int, progress: bool, label: str, allow_longer: bool):
    """snapkv_ext.prefill with a bar over layers x tokens (tokens/s); -> (logits [B, 1, V], extra)."""
    from ..prefill import prefill, prefill_memory

    L = ids.shape[1]
    n_layers = len(cache.layers)
    parts = prefill_memory(model, cache, ids.shape[0], L, chunk_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers * L, desc=f"{label} layer-major prefill", unit="tok", unit_scale=True, leave=False)
    done = [0]

    def step(layer, end, total):
        if bar is not None:
            bar.set_description(f"{label} layer {layer + 1}/{n_layers}")
            bar.update(layer * total + end - done[0])
            done[0] = layer * total + end

    try:
        logits = prefill(model, ids, cache, chunk_size=chunk_size, allow_longer=allow_longer, progress=step)
    finally:
        if bar is not None:
            bar.close()
    return logits[:, None], dict(chunk_size=chunk_size, prefill_memory=parts)


def held_per_head(cache: SnapKVCache) -> int:
    """The most entries a global layer holds per KV head (a row's mean under a per-head policy)."""
    from ..layers import SnapKVLayer

    return max((lay.held_per_head() for lay in cache.layers if isinstance(lay, SnapKVLayer)), default=0)


def generate(model, tokenizer, input_ids: torch.Tensor, method: Method, max_new_tokens: int = 32,
             progress: bool = False, label: str = "", chunk_size: Optional[int] = None,
             allow_longer: bool = False, document=None) -> GenerationResult:
    """Greedy generation of one prompt with timing: prefill (the whole prompt in one forward,
    each layer compressed right after its attention; or with ``chunk_size``, SnapKV layer by layer
    in chunks: :func:`snapkv_ext.prefill`) and a decoding loop. ``document``: a
    :class:`~snapkv_ext.SnapKVDocument` of the prompt's first tokens; only the rest is run, SnapKV
    selecting over the document's stored KV plus the rest (the same selection as from scratch)."""
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    L = ids.shape[1]
    run_ids, run_kw = ids, {}
    if document is not None and not method.is_full:
        cache = document.cache_for(config=method.config(L))
        run_ids = ids[:, document.length:]
        run_kw = dict(position_ids=torch.arange(document.length, L, device=device)[None])
    else:
        cache = method.make_cache(model, L)
    layer_major = chunk_size is not None and isinstance(cache, SnapKVCache)
    extra = {}
    bar = None
    if progress and not layer_major:
        from tqdm.auto import tqdm

        n_layers = len(getattr(getattr(model, "model", model), "layers", []))
        bar = tqdm(total=n_layers, desc=f"{label} prefill {L} tokens", unit="layer", leave=False)
    eos_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_token_id
    eos = set(eos_id) if isinstance(eos_id, (list, tuple)) else ({eos_id} if eos_id is not None else set())
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        if layer_major:
            logits, extra = _prefill_layer_major(model, ids, cache, chunk_size, progress, label, allow_longer)
        else:
            with _layer_progress(model, bar.update if bar else None):
                logits = model(run_ids, **run_kw, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        _sync(device)
        prefill_s = time.perf_counter() - t0
        if bar:
            bar.close()
        kv = cache_bytes(cache)
        full_kv = cache.stats()["full_kv_bytes"] if isinstance(cache, SnapKVCache) else kv
        tok = logits[:, -1:].argmax(-1)
        out = [int(tok)]
        dbar = None
        if progress:
            from tqdm.auto import tqdm

            dbar = tqdm(total=max_new_tokens, desc=f"{label} decoding", unit="tok", leave=False)
            dbar.update(1)
        bounded = isinstance(cache, SnapKVCache) and cache.config.max_capacity_decode is not None
        t1 = time.perf_counter()
        for step in range(max_new_tokens - 1):
            if out[-1] in eos:
                break
            logits = model(tok, **cache_kwargs(model, cache), use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
            out.append(int(tok))
            if dbar:
                dbar.update(1)
                if bounded and step % 16 == 0:  # a decode budget: the held entries as they go
                    dbar.set_postfix_str(f"held {held_per_head(cache)}/head, KV {cache_bytes(cache) / 2**20:.1f} MB")
        _sync(device)
        decode_s = time.perf_counter() - t1
        if dbar:
            dbar.close()
    steps = len(out) - 1
    if isinstance(cache, SnapKVCache):
        extra = dict(extra, kv_bytes_end=cache_bytes(cache), held_per_head_end=held_per_head(cache))
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationResult(text=text, tokens=out, prefill_s=prefill_s,
                            decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else float("nan"),
                            kv_bytes=kv, full_kv_bytes=full_kv, prompt_tokens=L, extra=extra)


# ---------------------------------------------------------------- needle in a haystack


def needle_eval(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], methods: Sequence[Method],
                max_new_tokens: int = 14, seed: int = 0, progress: bool = False, read_once: bool = False) -> Dict:
    """Pass-key retrieval for every (length, depth) and method. Returns a JSON-able dict.
    ``read_once``: each prompt's document part is read once (a :class:`~snapkv_ext.SnapKVDocument`)
    and every SnapKV method runs only the prompt's last tokens against it (the same selection as
    from scratch, many methods for little more than one)."""
    results = {m.name: [[None] * len(depths) for _ in lengths] for m in methods}
    settings = {m.name: dict(max_capacity_prompt=m.max_capacity_prompt, compression_ratio=m.compression_ratio)
                for m in methods}
    cells = [(i, n, j, d) for i, n in enumerate(lengths) for j, d in enumerate(depths)]
    it = cells
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cells, desc="needle", unit="case")
    prompt_tokens = {}
    for i, n, j, d in it:
        case = needle_case(tokenizer, n, d, seed=seed)
        ids = chat_ids(tokenizer, case.prompt)
        prompt_tokens[n] = ids.shape[1]
        doc = _read_once(model, ids, methods) if read_once else None
        for m in methods:
            r = generate(model, tokenizer, ids, m, max_new_tokens=max_new_tokens, document=doc)
            results[m.name][i][j] = bool(retrieved(r.text, case.answer))
        del doc
    summary = {name: sum(sum(bool(x) for x in row) for row in grid) for name, grid in results.items()}
    return dict(lengths=list(lengths), prompt_tokens=[prompt_tokens[n] for n in lengths], depths=list(depths),
                methods=settings, retrieved=results, summary=summary, cases=len(cells))


def _read_once(model, ids: torch.Tensor, methods: Sequence[Method]):
    """A SnapKVDocument of ``ids`` but its last ``2 x`` the widest window (None: nothing compresses)."""
    from ..document import SnapKVDocument

    L = ids.shape[1]
    windows = [m.config(L).window_size for m in methods if m.compresses(L)]
    if not windows:
        return None
    w = max(windows)
    return SnapKVDocument(model, ids[:, :L - 2 * w], max_capacity_prompt=w + 1, window_size=w,
                          max_question_tokens=2 * w)


def plot_needle(res: Dict, path_prefix: str) -> List[str]:
    """One heatmap per method (green = retrieved), the field's classic figure. Returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    paths = []
    for name, grid in res["retrieved"].items():
        data = torch.tensor([[1.0 if x else 0.0 for x in row] for row in grid]).T.numpy()  # depth x length
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(res["lengths"]), 1.2 + 0.5 * len(res["depths"])), dpi=100)
        ax.imshow(data, cmap=ListedColormap(["#d9534f", "#5cb85c"]), vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(res["lengths"])), [str(t) for t in res["prompt_tokens"]])
        ax.set_yticks(range(len(res["depths"])), [f"{int(100 * d)}%" for d in res["depths"]])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{name}: {res['summary'][name]}/{res['cases']} retrieved")
        ax.set_xticks([x - 0.5 for x in range(1, len(res["lengths"]))], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, len(res["depths"]))], minor=True)
        ax.grid(which="minor", color="white", linewidth=2)
        ax.tick_params(which="minor", length=0)
        fig.tight_layout()
        path = f"{path_prefix}_{name.replace('%', 'pct')}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------- decoding benchmark


def decode_bench(model, tokenizer, lengths: Sequence[int], methods: Sequence[Method], steps: int = 16,
                 reps: int = 3, progress: bool = False) -> Dict:
    """ms per decoded token and KV MB against prompt length, per method (median of `reps`)."""
    from .haystack import haystack

    device = next(model.parameters()).device
    rows = []
    cells = [(n, m) for n in lengths for m in methods]
    it = cells
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cells, desc="bench", unit="run")
    for n, m in it:
        text = " ".join(haystack(n // 12 + 20))
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n].to(device)
        ms, mb, pre = [], None, []
        for _ in range(reps):
            r = generate(model, None, ids, m, max_new_tokens=steps)
            ms.append(1e3 / r.decode_tokens_per_s)
            pre.append(r.prefill_s)
            mb = r.kv_bytes / 2**20
        rows.append(dict(method=m.name, prompt_tokens=int(ids.shape[1]), ms_per_token=statistics.median(ms),
                         prefill_s=statistics.median(pre), kv_mb=mb))
    settings = {m.name: dict(max_capacity_prompt=m.max_capacity_prompt, compression_ratio=m.compression_ratio,
                             window_size=m.window_size, kernel_size=m.kernel_size, pooling=m.pooling,
                             policy=m.policy if isinstance(m.policy, str) else repr(m.policy))
                for m in methods if not m.is_full}
    return dict(rows=rows, methods=[m.name for m in methods], settings=settings, steps=steps, reps=reps)


_POLICY_LABELS = {"snapkv": "SnapKV", "pyramidkv": "PyramidKV", "adakv": "AdaKV", "ada-pyramidkv": "AdaKV + PyramidKV"}


def bench_labels(res: Dict):
    """(title, {method: legend label}) of the benchmark plot: what ran where, and what each name means."""
    title = (f"{res.get('model', 'model')}, {res.get('device', 'cpu')}, {res.get('dtype', 'float32')}: "
             f"{res['steps']} decoded tokens per run, median of {res['reps']}")
    labels = {}
    for name in res["methods"]:
        s = res.get("settings", {}).get(name)
        if s is None:
            labels[name] = f"{name} (the whole prompt)"
        else:
            what = _POLICY_LABELS.get(s.get("policy", "snapkv"), s.get("policy"))
            budget = (f"{s['max_capacity_prompt']}-token budget" if s.get("max_capacity_prompt") is not None
                      else f"{100 * s['compression_ratio']:g}% of the prompt")
            labels[name] = f"{name} ({what}, {budget})"
    return title, labels


def plot_bench(res: Dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, labels = bench_labels(res)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    fig.suptitle(title, fontsize=10)
    for name in res["methods"]:
        pts = [r for r in res["rows"] if r["method"] == name]
        x = [r["prompt_tokens"] for r in pts]
        a.plot(x, [r["ms_per_token"] for r in pts], marker="o", label=labels[name])
        b.plot(x, [r["kv_mb"] for r in pts], marker="o", label=labels[name])
    a.set_title("decoding time")
    a.set_xlabel("prompt length (tokens)")
    a.set_ylabel("ms per token")
    b.set_title("KV cache memory")
    b.set_xlabel("prompt length (tokens)")
    b.set_ylabel("MB")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    # The title and legend also as the PNG's text fields, for whoever reads the file without looking.
    fig.savefig(path, metadata={"Title": title, "Description": "; ".join(labels.values())})
    plt.close(fig)
    return path
