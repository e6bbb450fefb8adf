"""ONNX export: dynamic batch, names, opset, and agreement with PyTorch via onnxruntime."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tagmill.bundle import (
    ONNX_FILE,
    BundleError,
    Predictor,
    add_onnx,
    export_onnx,
    load_bundle,
    onnx_export,
    read_meta,
    save_bundle,
    verify_onnx,
)
from tests.bundle import SIZE, multilabel_onnx_bundle, tiny_meta, tiny_model


@pytest.fixture(scope="module", params=["test_efficientnet", "tf_efficientnet_lite0"])
def exported(request, tmp_path_factory) -> tuple[torch.nn.Module, Path, ort.InferenceSession]:
    architecture = request.param
    if architecture == "test_efficientnet":
        # save_bundle(onnx=True) goes through the same export; reuse the shared one
        location = multilabel_onnx_bundle()
        model, path = load_bundle(location)[0], Path(location) / ONNX_FILE
    else:
        model = tiny_model(architecture, seed=1)
        path = tmp_path_factory.mktemp(architecture) / "model.onnx"
        export_onnx(model, tiny_meta(architecture), str(path))
    return model, path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnx_matches_pytorch(exported, batch_size: int) -> None:
    model, _, session = exported
    images = torch.randn(batch_size, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch_size))

    (logits,) = session.run(["logits"], {"images": images.numpy()})  # (B, C)
    with torch.inference_mode():
        expected = model(images).numpy()  # (B, C)

    assert logits.shape == (batch_size, 3)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_graph_has_named_io_dynamic_batch_and_modern_opset(exported) -> None:
    _, path, _ = exported
    proto = onnx.load(str(path))

    (graph_input,) = proto.graph.input
    (graph_output,) = proto.graph.output
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images" and graph_output.name == "logits"
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_verify_compares_the_graph_with_a_model() -> None:
    location = multilabel_onnx_bundle()
    graph = (Path(location) / ONNX_FILE).read_bytes()
    model, meta = load_bundle(location)

    assert verify_onnx(graph, model, meta) < 1e-4
    with pytest.raises(BundleError, match="does not match PyTorch"):
        verify_onnx(graph, tiny_model(seed=99, bias=(3.0, -3.0, 0.0)), meta)


def test_falls_back_to_the_torchscript_exporter(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("cannot trace this model")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    model = tiny_model(seed=2).train()
    out = export_onnx(model, tiny_meta(), str(tmp_path / "m.onnx"))
    assert model.training  # the export ran on an eval-mode copy
    model.eval()

    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, SIZE, SIZE)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(images).numpy(), atol=1e-4, rtol=0)


def test_both_exporters_failing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    with pytest.raises(BundleError, match="cannot export EfficientNet to ONNX"):
        export_onnx(tiny_model(), tiny_meta(), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


def test_add_onnx_to_an_existing_bundle(tmp_path: Path, monkeypatch) -> None:
    # the bookkeeping is the point here; the fast TorchScript exporter keeps it quick
    def skip(*args, **kwargs):
        raise RuntimeError("not this exporter")

    monkeypatch.setattr(onnx_export, "_export_dynamo", skip)
    location = save_bundle(str(tmp_path / "b"), tiny_model(seed=3), tiny_meta())

    path = add_onnx(location)

    meta = read_meta(location)
    assert path.endswith(ONNX_FILE)
    assert meta.onnx_sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    torch_answer = Predictor.from_bundle(location).predict_tensor(torch.zeros(1, 3, SIZE, SIZE))[0]
    onnx_answer = Predictor.from_bundle(location, backend="onnx").predict_tensor(torch.zeros(1, 3, SIZE, SIZE))[0]
    assert onnx_answer.probabilities == pytest.approx(torch_answer.probabilities, abs=1e-4)
