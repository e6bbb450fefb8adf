"""`tagmill export --int8`: a calibrated INT8 graph, checked against fp32, used by the
onnx backend, and refused (nothing written) when it costs more than allowed."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from PIL import Image

import timm
import torch

from tagmill.bundle import BundleMeta, Predictor, add_onnx, save_bundle
from tagmill.bundle.format import INT8_FILE, ONNX_FILE, read_meta
from tagmill.bundle.predictor import PRECISIONS
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import BundleError, InputError, QuantizationError
from tagmill.serve import config as serve_config
from tests import images
from tests.cli import TINY, run
from tests.conftest import COLOURS

@pytest.fixture(scope="module")
def trained(colour_dataset, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    run("train", colour_dataset, "--out", str(root / "run"), *TINY, "--epochs", "3")  # trained: fp32 is right
    return root


def test_export_int8_checks_it_against_fp32_and_onnx_serves_it(trained, colour_dataset):
    bundle = trained / "bundle"
    result = run("export", str(trained / "run"), "--out", str(bundle), "--int8", "--int8-max-drop", "1.0")
    assert "model.int8.onnx" in result.output and "INT8: top-1 agreement" in result.output

    meta = read_meta(str(bundle))
    check = meta.int8
    assert check is not None and check["sha256"] == hashlib.sha256((bundle / INT8_FILE).read_bytes()).hexdigest()
    assert check["images"] == 12 and check["split"] == "val"  # the colour set's validation split
    assert check["calibration_images"] == 48  # every training image: fewer than the 200 asked for
    assert check["bias_correction_images"] == 48  # the same images, fewer than the 64 it would use
    assert 0.0 <= check["agreement_rate"] <= 1.0 and check["metric"] == "accuracy"
    assert check["drop"] == pytest.approx(check["fp32"] - check["int8"], abs=1e-5)
    assert (bundle / ONNX_FILE).exists()  # --int8 implies the fp32 graph

    int8 = Predictor.from_bundle(str(bundle), backend="onnx")
    fp32 = Predictor.from_bundle(str(bundle), backend="onnx", precision="fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32") and "INT8" in int8.runs_on
    picture = images.encode(Image.new("RGB", (40, 40), COLOURS["blue"]), "PNG")
    (a,), (b,) = int8.predict_bytes([picture]), fp32.predict_bytes([picture])
    assert sum(a.scores.values()) == pytest.approx(1.0, abs=1e-4)
    assert max(abs(a.scores[c] - b.scores[c]) for c in a.scores) < 0.25  # the same model, 8-bit

    # `--precision int8` on a bundle without one, and on the torch backend, are errors
    plain = trained / "plain"
    run("export", str(trained / "run"), "--out", str(plain), "--onnx")
    with pytest.raises(BundleError, match="no INT8 graph"):
        Predictor.from_bundle(str(plain), backend="onnx", precision="int8")
    with pytest.raises(InputError, match="onnx backend"):
        Predictor.from_bundle(str(bundle), precision="int8")
    from tagmill.serve.server import check_bundle  # serve refuses before it binds a port

    with pytest.raises(BundleError, match="no INT8 graph"):
        check_bundle(serve_config.ServeConfig(bundle=str(plain), backend="onnx", precision="int8"))
    check_bundle(serve_config.ServeConfig(bundle=str(bundle), backend="onnx", precision="int8"))
    assert Predictor.from_bundle(str(plain), backend="onnx").precision == "fp32"  # auto, nothing to use

    # a new model.onnx makes the INT8 graph stale: model.json stops naming it
    copy = trained / "copy"
    shutil.copytree(bundle, copy)
    add_onnx(str(copy))
    assert read_meta(str(copy)).int8 is None and Predictor.from_bundle(str(copy), backend="onnx").precision == "fp32"


def test_an_int8_graph_that_costs_too_much_is_refused_and_nothing_is_written(colour_dataset, tmp_path):
    """A randomly initialised network: its logits differ by hundredths, so 8-bit rounding
    changes some answers (seeded: seed 2 loses one of its 12 validation images)."""
    from tagmill.bundle.quantize import add_int8

    torch.manual_seed(2)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    meta = BundleMeta(architecture="test_efficientnet", task="single", classes=("blue", "green", "red"),
                      preprocess=Preprocess(input_size=48))
    bundle = Path(save_bundle(str(tmp_path / "bundle"), model, meta, onnx=True))
    before = (bundle / "model.json").read_bytes()
    with pytest.raises(QuantizationError, match="more than the 0.0000 allowed") as caught:
        add_int8(str(bundle), colour_dataset, max_drop=0.0)
    assert caught.value.exit_code == 10 and isinstance(caught.value, BundleError)
    assert "keeps its fp32 graphs only" in caught.value.message
    assert (bundle / "model.json").read_bytes() == before and not (bundle / INT8_FILE).exists()

    accepted = add_int8(str(bundle), colour_dataset, max_drop=0.5)  # the same graph, a looser bound
    assert accepted.int8 is not None and accepted.int8["drop"] > 0 and accepted.int8["agreement_rate"] < 1


def test_bad_int8_options_are_input_errors(trained, colour_dataset):
    from tagmill.bundle.quantize import add_int8

    run("export", str(trained / "run"), "--out", str(trained / "x"), "--int8-max-drop", "0.1", code=2)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        add_int8(str(trained / "bundle"), colour_dataset, max_drop=1.5)
    with pytest.raises(InputError, match="at least one image"):
        add_int8(str(trained / "bundle"), colour_dataset, calibration_images=0)


def test_serve_config_knows_the_predictor_precisions_without_importing_it():
    assert serve_config.PRECISIONS == PRECISIONS
    with pytest.raises(InputError, match="onnx backend"):
        serve_config.ServeConfig(bundle="b", precision="int8")
    with pytest.raises(InputError, match="unknown precision"):
        serve_config.ServeConfig(bundle="b", backend="onnx", precision="int4")



def test_bias_correction_removes_the_int8_graphs_mean_error_and_changes_only_biases(colour_dataset):
    """A network whose batch norms fold into convolution biases (random statistics, as
    trained ones have), quantized with and without bias correction on the colour set's
    training images: on those images the corrected graph's logits lose most of their
    mean error against fp32, and the graph is the same but for int32 biases."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from tagmill.bundle.onnx_export import make_session, onnx_bytes
    from tagmill.bundle.quantize import calibration_batches, quantize_graph

    torch.manual_seed(2)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # timm's initial statistics (mean 0, shift 0) fold into no bias at all: nothing to correct
        norm.running_mean.normal_(0, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_(0, 0.5)
    meta = BundleMeta(architecture="test_efficientnet", task="single", classes=("blue", "green", "red"),
                      preprocess=Preprocess(input_size=48))
    fp32 = onnx_bytes(model, meta)
    batches = calibration_batches(colour_dataset, meta, 48)
    plain, corrected = quantize_graph(fp32, batches, bias_correction=False), quantize_graph(fp32, batches)

    images = np.concatenate(batches)  # (48, 3, 48, 48)
    reference = make_session(fp32).run(["logits"], {"images": images})[0]  # (48, 3)

    def mean_error(graph: bytes) -> float:
        return float(np.abs((make_session(graph).run(["logits"], {"images": images})[0] - reference).mean(axis=0)).mean())

    # each convolution's mean is matched, not the logits': the SiLUs and squeeze-excite
    # gates between convolutions keep part of the error (seeded: 0.027 -> 0.018)
    assert mean_error(corrected) < 0.8 * mean_error(plain), (mean_error(plain), mean_error(corrected))

    before, after = onnx.load_model_from_string(plain), onnx.load_model_from_string(corrected)
    assert [(n.op_type, list(n.input)) for n in before.graph.node] == [(n.op_type, list(n.input)) for n in after.graph.node]
    changed = {a.name for a, b in zip(before.graph.initializer, after.graph.initializer, strict=True)
               if not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))}
    assert changed, "no bias was corrected"
    assert all(i.data_type == onnx.TensorProto.INT32 for i in after.graph.initializer if i.name in changed)


@pytest.mark.parametrize("architecture, stem", [("tf_efficientnet_lite0", 2), ("mobilenetv3_small_100", 1),
                                                ("resnet18", 1), ("test_vit", 1)])
def test_the_stem_reads_the_image_in_float_and_every_later_convolution_is_int8(colour_dataset, architecture, stem):
    # the stem: convolutions up to the first 1x1, through activations (Lite0: the 3x3 and
    # the depthwise 3x3 after it, through ReLU6; MobileNetV3's hard-swish, which
    # onnxruntime's pre-processing splits into two nodes, ends it after the 3x3; ResNet:
    # the 7x7; a ViT: its patch embedding)
    import onnx

    from tagmill.bundle.onnx_export import onnx_bytes
    from tagmill.bundle.quantize import calibration_batches, quantize_graph

    model = timm.create_model(architecture, pretrained=False, num_classes=3).eval()
    meta = BundleMeta(architecture=architecture, task="single", classes=("blue", "green", "red"),
                      preprocess=Preprocess(input_size=32 if architecture == "test_vit" else 48))
    graph = onnx.load_model_from_string(quantize_graph(onnx_bytes(model, meta),
                                                       calibration_batches(colour_dataset, meta, 16),
                                                       bias_correction=False))
    producer = {o: n.op_type for n in graph.graph.node for o in n.output}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert producer.get(convs[0].input[0]) is None  # the image itself, not a rounded copy
    quantized = [producer.get(c.input[0]) == producer.get(c.input[1]) == "DequantizeLinear" for c in convs]
    assert quantized == [False] * stem + [True] * (len(convs) - stem)
