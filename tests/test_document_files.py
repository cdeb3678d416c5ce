"""Saved documents are checked on load: every field present, with the type, dtype and shape this
model and the stored ids call for, and the format's version; anything else is one ValueError that
names the file and what is wrong, before anything is generated."""
import pytest
import torch

from conftest import prompt
from snapkv_ext.document import SnapKVDocument
from snapkv_ext.tools.models import tiny_model

SETTINGS = dict(max_capacity_prompt=64, window_size=16, kernel_size=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A document on a model with global and sliding-window layers, continued by append (its stored
    lengths differ per layer), saved once; -> (model, document, the saved dict, its path)."""
    model = tiny_model("gemma2", layers=2)
    doc = SnapKVDocument(model, prompt(150, seed=3), **SETTINGS)
    doc.append(prompt(9, seed=4))
    path = tmp_path_factory.mktemp("doc") / "doc.pt"
    doc.save(str(path))
    return model, doc, torch.load(path, weights_only=True), path


def test_round_trip(saved):
    model, doc, data, path = saved
    assert [k.shape[2] for k in data["keys"]] == [23, 159]  # a sliding layer keeps its window - 1
    back = SnapKVDocument.load(model, str(path))
    q = prompt(10, seed=5)
    assert torch.equal(back.generate(q, max_new_tokens=5), doc.generate(q, max_new_tokens=5))


def _refused(saved, tmp_path, data, match):
    model, _, _, _ = saved
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(ValueError, match=match) as e:
        SnapKVDocument.load(model, str(path))
    assert str(path) in str(e.value)


FIELDS = ["fingerprint", "config", "max_question_tokens", "input_ids", "keys", "values", "q_tails"]


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_missing(saved, tmp_path, field):
    data = {k: v for k, v in saved[2].items() if k != field}
    _refused(saved, tmp_path, data, f"the field '{field}' is missing")


@pytest.mark.parametrize("field", FIELDS)
def test_each_field_of_another_type(saved, tmp_path, field):
    data = dict(saved[2], **{field: "text"})
    _refused(saved, tmp_path, data, f"'{field}' must be a ")


def _with(data, name, i, tensor):
    out = dict(data)
    out[name] = list(data[name])
    out[name][i] = tensor
    return out


@pytest.mark.parametrize("name", ["keys", "values", "q_tails"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("change", ["heads", "length", "head_dim", "dtype", "batch"])
def test_each_tensor_of_another_shape(saved, tmp_path, name, layer, change):
    t = saved[2][name][layer]
    B, H, n, D = t.shape
    bad = {"heads": torch.zeros(B, H + 1, n, D), "length": torch.zeros(B, H, n - 1, D),
           "head_dim": torch.zeros(B, H, n, D * 2), "dtype": t.to(torch.float64), "batch": torch.zeros(2, H, n, D)}
    _refused(saved, tmp_path, _with(saved[2], name, layer, bad[change]), rf"{name}\[{layer}\] must be torch.float32 ")


@pytest.mark.parametrize("name", ["keys", "values", "q_tails"])
def test_layer_count(saved, tmp_path, name):
    data = dict(saved[2], **{name: saved[2][name][:1]})
    _refused(saved, tmp_path, data, f"'{name}' has 1 layers, this model 2")


def test_ids_and_settings(saved, tmp_path):
    data = saved[2]
    _refused(saved, tmp_path, dict(data, input_ids=data["input_ids"].float()), "input_ids must be int64 ")
    _refused(saved, tmp_path, dict(data, input_ids=data["input_ids"][:, :-3]), r"keys\[1\] must be torch.float32 \[1, 2, 156, 16\]")
    _refused(saved, tmp_path, dict(data, input_ids=data["input_ids"][:, :10]), r"L > window_size \(16\)")
    _refused(saved, tmp_path, dict(data, config=dict(data["config"], window_size=-1)), "not valid SnapKV settings")
    _refused(saved, tmp_path, dict(data, config=dict(data["config"], colour="blue")), "not valid SnapKV settings")
    _refused(saved, tmp_path, dict(data, max_question_tokens=0), "max_question_tokens must be positive")
    _refused(saved, tmp_path, dict(data, max_question_tokens=True), "'max_question_tokens' must be a int")
    fp = {k: v for k, v in data["fingerprint"].items() if k != "weights"}
    _refused(saved, tmp_path, dict(data, fingerprint=fp), "the model fingerprint has fields")


def test_future_format(saved, tmp_path):
    data = dict(saved[2], format="snapkv-document/2")
    _refused(saved, tmp_path, data, "is a saved document of format 'snapkv-document/2', and this snapkv-ext reads "
                                    "'snapkv-document/1': load it with the snapkv-ext version that wrote it, or read "
                                    "the document again")
