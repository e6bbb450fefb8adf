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
