"""Scaling out: tensor parallelism across processes, and models spread over devices or offloaded.

Tensor parallel: 2 processes (torchrun, gloo, CPU) load each saved random-weight model with
Transformers' tensor parallelism (``tests/tp_worker.py``); the test compares what each process
generated and kept with the single-process run of the same weights: equal tokens, each process
keeping exactly the single-process selection for its own KV heads, each holding 1/2 of the KV
bytes; shardings that split KV heads, and caches made for the other sharding, refused in one line.

device_map: layers on the CPU and offloaded to disk through accelerate (and, with GPUs, spread over
them): equal tokens and selections, each layer's KV on the device its attention ran on.
"""
import json
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import greedy, prompt
from snapkv_ext import SnapKVCache, SnapKVDocument
from snapkv_ext.tools.models import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
KW = dict(max_capacity_prompt=40, window_size=8, kernel_size=5)
# Families with GQA whose plan splits the heads: Llama (8 query heads over 4 KV heads: 2 KV heads per
# process), Qwen3 (groups of 3, per-head q norm) and Gemma 3 (per-head q norm, sliding and global
# layers alternating; its random weights repeat one token, so its selection is the stronger check).
# And two whose plan gathers them on every process (each keeps all heads): OLMo 2 (q norm over the
# whole projection) and Phi-3 (fused qkv_proj).
TP_CASES = {
    "llama": dict(arch="llama", layers=2, heads=8, kv_heads=4),
    "qwen3": dict(arch="qwen3", layers=2, heads=6, kv_heads=2),
    "gemma3": dict(arch="gemma3", layers=4, heads=4, kv_heads=2),
    "olmo2": dict(arch="olmo2", layers=2, heads=4, kv_heads=2),
    "phi3": dict(arch="phi3", layers=2, heads=4, kv_heads=2),
}
GATHERED = {"olmo2", "phi3"}
MODEL_CLASS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM",
               "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM"}
SHAPE = dict(prompt=160, doc=120, question=12, new=6)
# Shardings the cache refuses at construction: (model, DistributedConfig settings, the message).
TP_REFUSED = "SnapKVCache: LlamaForCausalLM is sharded over 2 tensor-parallel processes, but layer 0"
REFUSED = {
    # MQA: 1 KV head cannot be split over 2 processes (Transformers' plan would cut it in half).
    "mqa": (dict(arch="llama", layers=2, heads=4, kv_heads=1), dict(tp_plan="auto"),
            f"{TP_REFUSED}'s 1 KV heads do not divide over them: SnapKV keeps whole KV heads (each with its GQA "
            "group) on one process; use a number of processes that divides num_key_value_heads (1)"),
    # Query heads split, KV heads gathered on every process: a GQA group spread over processes.
    "split_groups": (dict(arch="llama", layers=2, heads=4, kv_heads=2),
                     dict(tp_plan={"model.layers.*.self_attn.q_proj": "colwise",
                                   "model.layers.*.self_attn.k_proj": "colwise_gather_output",
                                   "model.layers.*.self_attn.v_proj": "colwise_gather_output",
                                   "model.layers.*.self_attn.o_proj": "rowwise"}),
                     f"{TP_REFUSED}'s plan splits its query heads over them and not its KV heads: SnapKV scores "
                     "each KV head with its whole GQA group of query heads on one process; shard q_proj and k_proj "
                     "alike"),
    # Pipeline parallel: each process holds some of the layers.
    "pipeline": (dict(arch="llama", layers=2, heads=4, kv_heads=2), dict(pp_size=2),
                 "SnapKVCache does not support pipeline parallelism (LlamaForCausalLM is split over 2 pipeline "
                 "stages, each holding only its own layers); use tensor parallelism or a device_map "
                 "(docs/scaling-out.md)"),
}
TIMEOUT_S = 300


def save(spec: dict, path: str) -> str:
    spec = dict(spec)
    tiny_model(spec.pop("arch"), **spec).save_pretrained(path)
    return path


def load(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """Save the models, run them on 2 tensor-parallel processes: ({case: path}, [per-rank results])."""
    tmp = tmp_path_factory.mktemp("tp")
    paths = {name: save(spec, str(tmp / name)) for name, spec in TP_CASES.items()}
    cases = [dict(name=name, path=path, **SHAPE) for name, path in paths.items()]
    for name, (spec, distributed, _) in REFUSED.items():
        cases.append(dict(name=name, path=save(spec, str(tmp / name)), distributed=distributed, refused=True))
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps({"cases": cases, "kw": KW, "out": str(tmp)}))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           os.path.join(ROOT, "tests", "tp_worker.py"), str(spec_file)]
    # Its own process group, so that a timeout ends torchrun and both workers, not only torchrun.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the tensor-parallel run did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"the tensor-parallel run failed (exit {proc.returncode}):\n{log[-4000:]}")
    return paths, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tp_run):
    """The same models, cache settings and prompts in this one process."""
    out = {}
    for name, path in tp_run[0].items():
        model = load(path)
        cache = SnapKVCache(model, **KW)
        ids, doc, question = prompt(SHAPE["prompt"]), prompt(SHAPE["doc"], seed=1), prompt(SHAPE["question"], seed=2)
        document = SnapKVDocument(model, doc, **KW)
        n = SHAPE["new"]
        out[name] = {"tokens": greedy(model, ids, cache, n=n),
                     "kept": [layer.positions for layer in cache.layers],
                     "kv_bytes": cache.stats()["kv_bytes"],
                     "doc_bytes": document.nbytes(),
                     "doc_tokens": document.generate(question, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                     pad_token_id=0),
                     "doc_batch": document.generate([question, prompt(9, seed=4)], max_new_tokens=4)}
    return out


@pytest.mark.parametrize("name", TP_CASES)
def test_tensor_parallel_tokens_equal_the_single_process_run(tp_run, single, name):
    for rank, res in enumerate(tp_run[1]):
        got = res[name]
        assert torch.equal(got["tokens"], single[name]["tokens"]), f"rank {rank}: SnapKVCache"
        assert torch.equal(got["doc_tokens"], single[name]["doc_tokens"]), f"rank {rank}: SnapKVDocument"
        assert got["doc_batch"] == single[name]["doc_batch"], f"rank {rank}: SnapKVDocument, a batch of questions"


@pytest.mark.parametrize("name", TP_CASES)
def test_each_rank_keeps_the_single_process_selection_of_its_own_heads(tp_run, single, name):
    want = single[name]["kept"]
    kv_heads = TP_CASES[name]["kv_heads"]
    share = kv_heads if name in GATHERED else kv_heads // WORLD
    for i, whole in enumerate(want):
        assert whole.shape[1] == kv_heads
        for rank, res in enumerate(tp_run[1]):
            kept = res[name]["kept"][i]
            assert kept.shape[1] == share, f"rank {rank}, layer {i}: holds {kept.shape[1]} KV heads, not {share}"
            heads = slice(0, kv_heads) if name in GATHERED else slice(rank * share, (rank + 1) * share)
            assert torch.equal(kept, whole[:, heads]), f"rank {rank}, layer {i}: another selection for its heads"
    assert any(w.shape[2] < SHAPE["prompt"] for w in want), "the prompt was compressed"


@pytest.mark.parametrize("name", TP_CASES)
def test_each_rank_holds_its_share_of_the_kv_bytes(tp_run, single, name):
    processes = 1 if name in GATHERED else WORLD
    for rank, res in enumerate(tp_run[1]):
        assert res[name]["kv_bytes"] * processes == single[name]["kv_bytes"], f"rank {rank}: cache"
        assert res[name]["doc_bytes"] * processes == single[name]["doc_bytes"], f"rank {rank}: document store"


@pytest.mark.parametrize("name", REFUSED)
def test_shardings_the_cache_cannot_keep_whole_are_refused_in_one_line(tp_run, name):
    want = f"ValueError: {REFUSED[name][2]}"
    for rank, res in enumerate(tp_run[1]):
        assert res[name] == {"cache": want, "document": want}, f"rank {rank}"


@pytest.mark.parametrize("name", TP_CASES)
def test_a_cache_for_the_other_sharding_is_refused_in_one_line(tp_run, name):
    for res in tp_run[1]:
        got, model_cls = res[name], MODEL_CLASS[name]
        assert got["unsharded_cache_on_sharded_model"] == (
            f"ValueError: this SnapKVCache was built for {model_cls} not sharded, and is used with a model sharded "
            "over 2 tensor-parallel processes; create the cache from the model it runs with")
        assert got["sharded_cache_on_unsharded_model"] == (
            f"ValueError: this SnapKVCache was built for {model_cls} sharded over 2 tensor-parallel processes, and "
            "is used with a model not sharded; create the cache from the model it runs with")


def test_a_model_sharded_after_its_cache_was_built_is_refused_in_one_line():
    """What each process sees when the model is sharded in place after the cache was made: its
    projections now compute half the heads (as a column-wise shard does)."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    cache, short = SnapKVCache(model, **KW), SnapKVCache(model, **KW)
    for layer in model.model.layers:
        a = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            full = getattr(a, name)
            half = torch.nn.Linear(full.in_features, full.out_features // 2, bias=False)
            half.weight.data.copy_(full.weight.data[: full.out_features // 2])
            setattr(a, name, half)
        a.o_proj = torch.nn.Linear(a.o_proj.in_features // 2, a.o_proj.out_features, bias=False)
    with pytest.raises(ValueError) as e:
        greedy(model, prompt(160), cache, n=1)  # selects: the query heads are checked first
    assert str(e.value) == ("SnapKVCache: layer 0 computes 2 query heads on this process, but the cache was built "
                            "for 4 (its model not sharded); create the cache from the model it runs with, on every "
                            "process, after the model is sharded")
    with pytest.raises(ValueError, match=r"^SnapKVCache: layer 0 computes 1 KV heads on this process, but the cache "
                                         r"was built for 2 \(its model not sharded\)"):
        greedy(model, prompt(20), short, n=1)  # shorter than the budget: nothing selects, the keys are checked


# ---------------------------------------------------------------- device_map and offload

N_LAYERS = 4
# (embeddings and head, layers): where accelerate puts them ("cpu"/"disk" on a machine with GPUs:
# offloaded, run on the first GPU). The head sits with the embeddings: Gemma 3 ties them.
DEVICE_MAPS = {
    # CPU-only: the embeddings, head and every other layer offloaded to disk (read back per forward).
    "cpu+disk": ("disk", ["cpu", "disk", "cpu", "disk"]),
    # One GPU: half the layers on it, the embeddings and the other half offloaded to the CPU.
    "cuda+cpu": ("cpu", [0, 0, "cpu", "cpu"]),
    # Several GPUs: layers spread over two, one offloaded to disk.
    "cuda0+cuda1": (0, [0, 0, 1, "disk"]),
}
GPUS_NEEDED = {"cpu+disk": 0, "cuda+cpu": 1, "cuda0+cuda1": 2}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("where", [
    pytest.param(name, marks=pytest.mark.skipif(torch.cuda.device_count() < GPUS_NEEDED[name],
                                                reason=f"needs {GPUS_NEEDED[name]} GPUs"))
    for name in DEVICE_MAPS])
def test_device_map_keeps_each_layers_kv_where_its_attention_runs(tmp_path, arch, where):
    model = tiny_model(arch, layers=N_LAYERS, heads=4, kv_heads=2)
    model.save_pretrained(tmp_path / "model")
    ends, layers = DEVICE_MAPS[where]
    device_map = {"model.embed_tokens": ends, "model.rotary_emb": ends, "model.norm": ends, "lm_head": ends,
                  **{f"model.layers.{i}": d for i, d in enumerate(layers)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Some parameters are on the meta device because they were offloaded"
        spread = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32, device_map=device_map,
                                                      offload_folder=str(tmp_path / "offload")).eval()
    ran_on = {}

    def record(module, args, kwargs):
        ran_on[module.layer_idx] = kwargs["hidden_states"].device

    hooks = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in spread.model.layers]
    try:
        # The reference: the whole model on one device of the same kind (same kernels, same rounding).
        model = model.to("cpu" if where == "cpu+disk" else "cuda:0")
        ids, doc, question = (t.to(model.device) for t in (prompt(160), prompt(120, seed=1), prompt(12, seed=2)))
        want_cache = SnapKVCache(model, **KW)
        want = greedy(model, ids, want_cache, n=6)
        cache = SnapKVCache(spread, **KW)
        assert torch.equal(greedy(spread, ids, cache, n=6).to(want.device), want)
        assert sum(c > 0 for c in cache.stats()["compressions"]) >= 1, "the prompt was compressed"
        for i, layer in enumerate(cache.layers):
            assert layer.keys.device == ran_on[i], f"layer {i}: KV on {layer.keys.device}, attention ran on {ran_on[i]}"
            want_kept = want_cache.layers[i].positions.cpu()
            assert torch.equal(layer.positions.cpu(), want_kept), f"layer {i}: another selection"
        if where == "cuda0+cuda1":
            assert len(set(ran_on.values())) >= 2, f"the layers ran on {set(ran_on.values())}"
        # The document: its store in CPU memory; each question's KV on each layer's device.
        document = SnapKVDocument(spread, doc, **KW)
        n = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        want = SnapKVDocument(model, doc, **KW).generate(question, **n)
        assert torch.equal(document.generate(question, **n).to(want.device), want)
        backed, _ = document.prefill(question)
        for i, layer in enumerate(backed.layers):
            assert layer.keys.device == ran_on[i], f"document, layer {i}: KV on {layer.keys.device}"
    finally:
        for h in hooks:
            h.remove()
