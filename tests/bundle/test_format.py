"""model.json + model.safetensors: round trips, contents, and every way a bundle breaks."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from datetime import datetime
from pathlib import Path

import pytest
import safetensors.torch
import torch

import tagmill
from tagmill.bundle import (
    MODEL_JSON,
    WEIGHTS_FILE,
    BundleError,
    BundleMeta,
    load_bundle,
    read_meta,
    save_bundle,
)
from tagmill.bundle.format import load_weights, weights_bytes
from tagmill.errors import InputError, TagmillError
from tests.bundle import CLASSES, SIZE, tiny_meta, tiny_model


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))  # (4, 3, S, S)
    with torch.inference_mode():
        return model.eval()(images)  # (4, C)


def _rewrite_json(bundle: Path, **changes) -> None:
    data = json.loads((bundle / MODEL_JSON).read_text())
    data.update(changes)
    (bundle / MODEL_JSON).write_text(json.dumps(data))


def _rewrite_weights(bundle: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights and record their checksum, as a mismatched bundle would."""
    data = safetensors.torch.save(tensors)
    (bundle / WEIGHTS_FILE).write_bytes(data)
    _rewrite_json(bundle, weights_sha256=hashlib.sha256(data).hexdigest())


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    save_bundle(str(out), tiny_model(), tiny_meta())
    return out


@pytest.mark.parametrize("architecture", ["test_efficientnet", "tf_efficientnet_lite0"])
def test_round_trip_gives_identical_outputs(tmp_path: Path, architecture: str) -> None:
    model = tiny_model(architecture, seed=7)
    meta = tiny_meta(architecture, task="multi", training={"epochs": 2}, metrics={"f1": 0.5})
    out = save_bundle(str(tmp_path / "b"), model, meta)

    loaded, loaded_meta = load_bundle(out)

    assert not loaded.training
    assert torch.equal(_outputs(loaded), _outputs(model))
    assert loaded_meta.classes == CLASSES and loaded_meta.task == "multi"
    assert loaded_meta.preprocess == meta.preprocess
    assert loaded_meta.training == {"epochs": 2} and loaded_meta.metrics == {"f1": 0.5}


def test_model_json_has_everything(bundle: Path) -> None:
    data = json.loads((bundle / MODEL_JSON).read_text())

    assert data["format"] == "tagmill.bundle" and data["schema_version"] == 1
    assert data["tagmill_version"] == tagmill.__version__
    assert data["architecture"] == "test_efficientnet"
    assert data["task"] == "single" and data["classes"] == list(CLASSES)
    assert data["preprocess"] == json.loads(json.dumps(tiny_meta().preprocess.as_dict()))
    assert data["preprocess"]["input_size"] == SIZE
    assert data["thresholds"] is None and data["default_top_k"] == 5
    assert data["training"] == {} and data["metrics"] == {}
    assert datetime.fromisoformat(data["created"].replace("Z", "+00:00")).tzinfo is not None
    assert data["weights_sha256"] == hashlib.sha256((bundle / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert read_meta(str(bundle)).to_dict() == data


def test_multilabel_thresholds_default_to_half_and_nan_metrics_become_null(tmp_path: Path) -> None:
    meta = tiny_meta(task="multi", metrics={"auroc": float("nan"), "loss": torch.tensor(0.25)})
    save_bundle(str(tmp_path / "b"), tiny_model(), meta)

    data = json.loads((tmp_path / "b" / MODEL_JSON).read_text())

    assert data["thresholds"] == [0.5, 0.5, 0.5]
    assert data["metrics"] == {"auroc": None, "loss": 0.25}


def test_weights_are_safetensors_and_loading_unpickles_nothing(bundle: Path, monkeypatch) -> None:
    raw = (bundle / WEIGHTS_FILE).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert "conv_stem.weight" in header

    def refuse(*args, **kwargs):
        raise AssertionError("loading a bundle must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, _ = load_bundle(str(bundle))
    assert torch.equal(_outputs(model), _outputs(tiny_model()))


def test_bundle_on_an_fsspec_url() -> None:
    url = "memory://tagmill-tests/bundle"
    save_bundle(url, tiny_model(), tiny_meta())

    model, meta = load_bundle(url)

    assert meta.classes == CLASSES
    assert torch.equal(_outputs(model), _outputs(tiny_model()))


def test_saving_over_a_bundle_replaces_it(bundle: Path) -> None:
    other = tiny_model(seed=5)
    save_bundle(str(bundle), other, tiny_meta(task="multi"))

    model, meta = load_bundle(str(bundle))

    assert meta.task == "multi"
    assert torch.equal(_outputs(model), _outputs(other))


def test_missing_model_json_is_not_a_bundle(bundle: Path, tmp_path: Path) -> None:
    (bundle / MODEL_JSON).unlink()
    with pytest.raises(BundleError, match="not a tagmill bundle: it has no model.json"):
        load_bundle(str(bundle))
    with pytest.raises(BundleError, match="not a tagmill bundle: no such directory"):
        load_bundle(str(tmp_path / "nowhere"))


def test_foreign_model_json_is_not_a_bundle(bundle: Path) -> None:
    (bundle / MODEL_JSON).write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(BundleError, match="not a tagmill bundle"):
        load_bundle(str(bundle))
    (bundle / MODEL_JSON).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(str(bundle))


def test_flipped_byte_fails_the_checksum(bundle: Path) -> None:
    data = bytearray((bundle / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0x01
    (bundle / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt or was replaced: its sha256"):
        load_bundle(str(bundle))


def test_missing_weights_is_incomplete(bundle: Path) -> None:
    (bundle / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match="incomplete: model.safetensors is missing"):
        load_bundle(str(bundle))


def test_wrong_shape_names_the_tensor(bundle: Path) -> None:
    _rewrite_json(bundle, classes=["cat", "dog", "owl", "bat"])  # model.json now wants 4 outputs
    with pytest.raises(BundleError, match=r"'classifier.weight' has shape \[3, .*\], the model expects \[4, "):
        load_bundle(str(bundle))


def test_renamed_tensor_is_named(bundle: Path) -> None:
    tensors = safetensors.torch.load((bundle / WEIGHTS_FILE).read_bytes())
    tensors["stem.weight"] = tensors.pop("conv_stem.weight")
    _rewrite_weights(bundle, tensors)
    with pytest.raises(BundleError, match="'conv_stem.weight' .* is missing from the weights"):
        load_bundle(str(bundle))


def test_extra_tensor_is_named(bundle: Path) -> None:
    tensors = safetensors.torch.load((bundle / WEIGHTS_FILE).read_bytes())
    tensors["backdoor"] = torch.zeros(2)
    _rewrite_weights(bundle, tensors)
    with pytest.raises(BundleError, match="'backdoor' .* is not part of the model"):
        load_bundle(str(bundle))


def test_garbage_weights_with_matching_checksum(bundle: Path) -> None:
    data = b"this is not safetensors"
    (bundle / WEIGHTS_FILE).write_bytes(data)
    _rewrite_json(bundle, weights_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(str(bundle))


def test_newer_schema_is_refused(bundle: Path) -> None:
    _rewrite_json(bundle, schema_version=2, tagmill_version="9.0.0")
    with pytest.raises(BundleError, match="schema version 2, newer than the 1") as caught:
        load_bundle(str(bundle))
    assert "9.0.0" in str(caught.value)


def test_unknown_architecture(bundle: Path) -> None:
    _rewrite_json(bundle, architecture="no_such_net_v9")
    with pytest.raises(BundleError, match="unknown architecture 'no_such_net_v9'"):
        load_bundle(str(bundle))


def test_invalid_values_in_model_json(bundle: Path) -> None:
    _rewrite_json(bundle, task="regression")
    with pytest.raises(BundleError, match="model.json is invalid: unknown task"):
        load_bundle(str(bundle))


def test_bundle_error_is_in_the_tree() -> None:
    assert issubclass(BundleError, TagmillError)
    assert BundleError.exit_code == 8 and BundleError.http_status == 500


def test_saving_a_model_that_does_not_fit_the_meta(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not match architecture 'test_efficientnet' with 4 classes"):
        save_bundle(str(tmp_path / "b"), tiny_model(),
                    BundleMeta(architecture="test_efficientnet", task="single", classes=("a", "b", "c", "d")))
    assert not (tmp_path / "b" / MODEL_JSON).exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "multi", "thresholds": (0.5,)}, "1 thresholds for 3 classes"),
        ({"task": "multi", "thresholds": (0.5, 2.0, 0.5)}, r"in \[0, 1\]"),
        ({"task": "single", "thresholds": (0.5, 0.5, 0.5)}, "multi-label models only"),
        ({"classes": ("a", "a")}, "duplicate class names"),
        ({"classes": ()}, "at least one class"),
        ({"default_top_k": 0}, "default_top_k"),
    ],
)
def test_meta_validation(changes: dict, message: str) -> None:
    values = {"architecture": "test_efficientnet", "task": "single", "classes": CLASSES, **changes}
    with pytest.raises(InputError, match=message):
        BundleMeta(**values)


class _Tied(torch.nn.Module):
    """Two layers that share one weight tensor, as tied embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight


def test_shared_tensors_are_stored_once_and_retied() -> None:
    source = _Tied()
    tensors = safetensors.torch.load(weights_bytes(source))  # safetensors refuses shared storage
    assert list(tensors) == ["a.weight"]

    target = _Tied()
    load_weights(target, tensors, source="test")

    assert torch.equal(target.b.weight, source.a.weight)
    assert target.a.weight is target.b.weight


def test_model_json_without_preprocess_is_refused(bundle: Path) -> None:
    data = json.loads((bundle / MODEL_JSON).read_text())
    del data["preprocess"]
    (bundle / MODEL_JSON).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="'preprocess' is missing"):
        load_bundle(str(bundle))


class _Wrapped(torch.nn.Module):
    """Shaped like DistributedDataParallel: the real model sits in ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_wrapped_model_is_saved_as_the_plain_model(tmp_path: Path) -> None:
    model = tiny_model(seed=4)
    save_bundle(str(tmp_path / "b"), _Wrapped(model), tiny_meta())

    loaded, _ = load_bundle(str(tmp_path / "b"))

    assert torch.equal(_outputs(loaded), _outputs(model))
