"""Shared fixtures: every op test runs on CPU, and on CUDA when a GPU is present."""
import subprocess
import tempfile

import pytest
import torch

import snapkv_ext
from snapkv_ext import reference as ref

# tests/cuda_sim runs in its own process, with the ASan runtime preloaded: tests/test_cuda_sim.py.
collect_ignore = ["cuda_sim"]


# Tests whose work is a single-threaded child process (the CUDA simulator's suite, the GPU
# first-contact dry run): the child starts when the session's tests are collected and the test
# that waits for it runs last, so the child runs beside the rest of the suite, not before it.
BACKGROUND = {"test_cuda_sim.py": "test_cuda_kernels_on_cpu_under_sanitizers",
              "test_gpu_check.py": "test_every_step_runs_and_returns_few_files"}
_started = []  # the modules whose child was started


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only a selected test starts its child
def pytest_collection_modifyitems(session, config, items):
    waiting = [item for item in items if BACKGROUND.get(item.path.name) == item.name]
    if waiting:
        items[:] = [item for item in items if item not in waiting] + waiting
        for item in waiting:
            item.module.start()
            _started.append(item.module)


def pytest_sessionfinish(session, exitstatus):
    for module in _started:
        module.stop()


class Background:
    """A BACKGROUND module's child process: started once (its module's start()), waited for by
    its test, killed at the session's end if still running (e.g. after -x)."""

    def __init__(self):
        self.proc = None
        self.log = None

    def start(self, cmd, **popen_kwargs) -> "Background":
        if self.proc is None:
            self.log = tempfile.TemporaryFile(mode="w+")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, **popen_kwargs)
        return self

    def wait(self, timeout: float) -> str:
        """The child's exit status is then ``self.proc.returncode``; returns its output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# A test on a real GPU: marked `gpu` (`pytest -m gpu` selects them, apart from the CPU execution of
# the CUDA kernels in test_cuda_sim.py) and skipped where there is none.
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def needs_gpu(test):
    """Decorator: a test that runs only on a real GPU (see GPU)."""
    for mark in GPU:
        test = mark(test)
    return test


DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        # A GPU without the CUDA kernels built is a broken install, not a skip.
        assert snapkv_ext.has_cuda_kernels(), "a GPU is present but snapkv_ext was built without CUDA kernels"
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(1234)


def randn(shape, dtype, device, gen, scale=1.0):
    """Random normal tensor made on the CPU (same values whatever the device), then moved."""
    return (torch.randn(shape, generator=gen) * scale).to(dtype=dtype, device=device)


def assert_scores_close(out, q, k, pad=None, group_reduce="mean", scale=None, softcap=None):
    """The kernel's error against float64 must be within ~2x what an fp32 reference costs."""
    pad = None if pad is None else pad.cpu()
    want = ref.window_scores(q.cpu(), k.cpu(), pad, group_reduce, scale, softcap)
    fp32 = ref.window_scores(q.cpu(), k.cpu(), pad, group_reduce, scale, softcap, dtype=torch.float32)
    assert out.dtype == torch.float32
    assert out.shape == want.shape
    got = out.cpu()
    assert torch.isfinite(got).all()
    ref_err = (fp32 - want).abs().max().item()
    err = (got - want).abs().max().item()
    floor = 1e-6 * want.abs().max().item() + 1e-9
    assert err <= 2 * ref_err + floor, f"error {err:.3g} vs fp32 reference error {ref_err:.3g}"


# ---- models: prompts, greedy generation, left-padded batches ----


def prompt(n, batch=1, seed=0, vocab=128):
    """Random token ids [batch, n] (ids >= 3: clear of pad/bos/eos), reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def greedy(model, ids, cache=None, n=8, **kw):
    """n greedy tokens after ids, with `cache` (None: the model's own cache)."""
    from snapkv_ext.cache import cache_kwargs

    extra = {} if cache is None else cache_kwargs(model, cache)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=kw.pop("attention_mask", torch.ones_like(ids)), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0, **extra, **kw)
    return out[:, ids.shape[1]:]


def left_pad(rows):
    """(ids, attention_mask) [len(rows), longest] of rows [1, n_i], each padded on the left with 0."""
    n = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1]:] = r[0]
        mask[i, n - r.shape[1]:] = 1
    return ids, mask


# ---- ragged attention: a flat per-head store and the error rule ----


def ragged_store(lengths, D, dtype, device, gen, gap=3, row_stride=None, offset=0):
    """A flat KV store holding one segment per (b, h) of ``lengths`` [B, H_kv] (a list of lists),
    with ``gap`` unused rows before each segment (filled with huge values, so reading one shows),
    rows of ``row_stride`` elements (>= D; the view is [N, D]) starting ``offset`` elements into the
    buffer (offset 1: rows not 16-byte aligned). Returns (keys, values, starts, lengths) on device."""
    row_stride = D if row_stride is None else row_stride
    ln = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.empty_like(ln)
    pos = 0
    for idx in range(ln.numel()):
        pos += gap
        starts.view(-1)[idx] = pos
        pos += int(ln.view(-1)[idx])
    N = pos + gap
    out = []
    for _ in range(2):
        buf = torch.full((N * row_stride + offset,), 1e4)
        store = buf[offset:].view(N, row_stride)
        for idx in range(ln.numel()):
            s0, L = int(starts.view(-1)[idx]), int(ln.view(-1)[idx])
            store[s0:s0 + L, :D] = torch.randn(L, D, generator=gen)
        out.append(buf.to(dtype=dtype, device=device)[offset:].view(N, row_stride)[:, :D])
    return out[0], out[1], starts.to(device), ln.to(device)


def assert_attention_close(out, q, k, v, starts, lengths, scale, softcap=None):
    """ragged_attention's output against the float64 reference: the error within ~2x what the
    same reference run in fp32 (output in q's dtype) costs anyway."""
    args = (starts.cpu(), lengths.cpu(), scale, softcap)
    want = ref.ragged_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), *args)
    low = ref.ragged_attention(q.cpu(), k.cpu(), v.cpu(), *args, dtype=torch.float32)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    got = out.cpu().double()
    assert torch.isfinite(got).all()
    ref_err = (low.double() - want).abs().max().item()
    err = (got - want).abs().max().item()
    floor = 1e-6 * want.abs().max().item() + 1e-7
    assert err <= 2 * ref_err + floor, f"error {err:.3g} vs fp32 reference error {ref_err:.3g}"
