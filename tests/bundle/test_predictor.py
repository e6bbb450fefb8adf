"""Predictor: real image bytes in every shape users send, both backends, thresholds, top-k."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagmill.bundle import ONNX_FILE, BundleError, Prediction, Predictor, save_bundle
from tagmill.dataset.images import decode, to_rgb
from tagmill.dataset.transforms import eval_transform
from tagmill.errors import InputError
from tests import images
from tests.bundle import CLASSES, MULTI_THRESHOLDS, multilabel_onnx_bundle, tiny_meta, tiny_model

GOOD = {
    "jpeg": images.jpeg_bytes(80, 50, seed=1),
    "png": images.png_bytes(50, 80, seed=2),
    "cmyk": images.cmyk_jpeg_bytes(),
    "grey16": images.grey16_png_bytes(),
    "rgba": images.rgba_png_bytes(),
    "palette": images.palette_png_bytes(),
    "exif": images.exif_rotated_jpeg_bytes(),
}
BAD = {
    "garbage": b"<html>not an image</html>",
    "truncated": images.truncated_jpeg_bytes(),
    "empty": b"",
}


@pytest.fixture(scope="module")
def torch_predictor() -> Predictor:
    return Predictor.from_bundle(multilabel_onnx_bundle())


@pytest.fixture(scope="module")
def onnx_predictor() -> Predictor:
    return Predictor.from_bundle(multilabel_onnx_bundle(), backend="onnx", intra_op_threads=1)


@pytest.fixture(scope="module")
def single_predictor() -> Predictor:
    # biases order the classes dog > owl > cat whatever the image
    return Predictor(tiny_model(bias=(0.0, 3.0, 1.0)), tiny_meta(task="single", default_top_k=2))


def _reference(predictor: Predictor, img: Image.Image) -> list[float]:
    """The import decoder + eval_transform + model, by hand."""
    batch = eval_transform(predictor.meta.preprocess)(to_rgb(img)).unsqueeze(0)  # (1, 3, S, S)
    return torch.sigmoid(predictor.logits(batch))[0].tolist()


def test_every_image_shape_is_predicted_like_import_decodes_it(torch_predictor: Predictor) -> None:
    results = torch_predictor.predict_bytes(list(GOOD.values()))

    for name, data, result in zip(GOOD, GOOD.values(), results, strict=True):
        assert result.error is None, name
        assert len(result.probabilities) == len(CLASSES)
        assert result.probabilities == pytest.approx(_reference(torch_predictor, decode(data)), abs=1e-6), name


def test_exif_rotation_and_transparency_are_applied(torch_predictor: Predictor) -> None:
    # fromarray drops the EXIF block, so predict_images does not rotate it a second time
    upright = Image.fromarray(np.asarray(decode(GOOD["exif"]))).transpose(Image.Transpose.ROTATE_270)  # orientation 6
    on_white = Image.new("RGB", (40, 40), (255, 255, 255))
    on_white.paste((255, 0, 0), (20, 0, 40, 40))  # the opaque right half of rgba_png_bytes

    exif, rgba = torch_predictor.predict_bytes([GOOD["exif"], GOOD["rgba"]])
    expected = torch_predictor.predict_images([upright, on_white])

    assert exif.probabilities == pytest.approx(expected[0].probabilities, abs=1e-6)
    assert rgba.probabilities == pytest.approx(expected[1].probabilities, abs=1e-6)


def test_bad_items_are_reported_and_the_rest_of_the_batch_is_fine(torch_predictor: Predictor) -> None:
    batch = [GOOD["jpeg"], BAD["garbage"], GOOD["png"], BAD["truncated"], BAD["empty"]]

    results = torch_predictor.predict_bytes(batch)
    alone = torch_predictor.predict_bytes([GOOD["jpeg"], GOOD["png"]])

    assert [r.ok for r in results] == [True, False, True, False, False]
    assert results[1].error == "not an image (unknown format)"
    assert results[3].error.startswith("corrupt image")
    assert results[4].error == "empty file (0 bytes)"
    assert results[1].probabilities == [] and results[1].labels == [] and results[1].top == []
    assert results[0].probabilities == pytest.approx(alone[0].probabilities, abs=1e-6)
    assert results[2].probabilities == pytest.approx(alone[1].probabilities, abs=1e-6)


def test_decompression_bomb_is_refused_per_item(torch_predictor: Predictor) -> None:
    bomb, ok = torch_predictor.predict_bytes([images.decompression_bomb_png_bytes(), GOOD["jpeg"]])
    assert bomb.error.startswith("decompression bomb refused") and ok.ok


def test_torch_and_onnx_backends_agree(torch_predictor: Predictor, onnx_predictor: Predictor) -> None:
    batch = [*GOOD.values(), BAD["garbage"]]

    by_torch = torch_predictor.predict_bytes(batch)
    by_onnx = onnx_predictor.predict_bytes(batch)

    for a, b in zip(by_torch, by_onnx, strict=True):
        assert a.error == b.error
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-4)
        assert a.labels == b.labels and [label for label, _ in a.top] == [label for label, _ in b.top]


def test_multilabel_thresholds_come_from_model_json(torch_predictor: Predictor) -> None:
    (result,) = torch_predictor.predict_bytes([GOOD["jpeg"]])

    assert torch_predictor.meta.thresholds == MULTI_THRESHOLDS
    assert result.probabilities[0] == pytest.approx(0.88, abs=0.01)  # below cat's 0.9
    assert result.labels == ["dog", "owl"]
    assert result.scores == dict(zip(CLASSES, result.probabilities, strict=True))
    assert [label for label, _ in result.top] == ["cat", "dog"]  # default_top_k=2 from model.json


def test_threshold_override_per_call(onnx_predictor: Predictor) -> None:
    one_for_all, per_class, default = (
        onnx_predictor.predict_bytes([GOOD["png"]], threshold=0.3)[0],
        onnx_predictor.predict_bytes([GOOD["png"]], threshold=[0.8, 0.6, 0.5])[0],
        onnx_predictor.predict_bytes([GOOD["png"]])[0],
    )
    assert one_for_all.labels == ["cat", "dog"]
    assert per_class.labels == ["cat"]
    assert default.labels == ["dog", "owl"]


def test_single_label_top_k_ordering(single_predictor: Predictor) -> None:
    default, three = single_predictor.predict_bytes([GOOD["jpeg"]])[0], single_predictor.predict_bytes(
        [GOOD["jpeg"]], top_k=10)[0]

    assert default.labels == ["dog"]
    assert [label for label, _ in default.top] == ["dog", "owl"]  # default_top_k=2
    assert [label for label, _ in three.top] == ["dog", "owl", "cat"]  # clamped to 3 classes
    scores = [score for _, score in three.top]
    assert scores == sorted(scores, reverse=True)
    assert math.fsum(three.probabilities) == pytest.approx(1.0, abs=1e-6)


def test_single_label_ignores_thresholds(single_predictor: Predictor) -> None:
    (result,) = single_predictor.predict_bytes([GOOD["jpeg"]], threshold=0.99)
    assert result.labels == ["dog"]


def test_predict_images_and_tensor(single_predictor: Predictor) -> None:
    rgba = Image.open(io.BytesIO(GOOD["rgba"]))
    from_image = single_predictor.predict_images([rgba])[0]
    from_bytes = single_predictor.predict_bytes([GOOD["rgba"]])[0]
    batch = eval_transform(single_predictor.meta.preprocess)(to_rgb(rgba)).unsqueeze(0)  # (1, 3, S, S)
    from_tensor = single_predictor.predict_tensor(batch)[0]

    assert from_image.probabilities == pytest.approx(from_bytes.probabilities, abs=1e-6)
    assert from_tensor.probabilities == pytest.approx(from_bytes.probabilities, abs=1e-6)


def test_batches_larger_than_batch_size_are_chunked() -> None:
    model, meta = tiny_model(), tiny_meta()
    chunked = Predictor(model, meta, batch_size=2).predict_bytes([GOOD["jpeg"], GOOD["png"], GOOD["cmyk"]])
    whole = Predictor(model, meta, batch_size=8).predict_bytes([GOOD["jpeg"], GOOD["png"], GOOD["cmyk"]])
    for a, b in zip(chunked, whole, strict=True):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)


def test_empty_request(single_predictor: Predictor) -> None:
    assert single_predictor.predict_bytes([]) == []


def test_prediction_as_dict_is_json(single_predictor: Predictor) -> None:
    good, bad = single_predictor.predict_bytes([GOOD["jpeg"], BAD["garbage"]])
    decoded = json.loads(json.dumps([good.as_dict(), bad.as_dict()]))
    assert decoded[0]["top"][0]["label"] == "dog" and decoded[1]["error"]
    assert Prediction(error="x").as_dict()["probabilities"] == []


@pytest.mark.parametrize(
    ("options", "message"),
    [({"top_k": 0}, "top_k"), ({"threshold": 1.5}, r"\[0, 1\]"), ({"threshold": [0.5]}, "1 thresholds")],
)
def test_bad_options_are_input_errors(single_predictor: Predictor, options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        single_predictor.predict_bytes([GOOD["jpeg"]], **options)


def test_wrong_tensor_shape_and_backend(single_predictor: Predictor) -> None:
    with pytest.raises(InputError, match=r"\(N, 3, 64, 64\)"):
        single_predictor.predict_tensor(torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputError, match="unknown backend"):
        Predictor(tiny_model(), tiny_meta(), backend="tensorrt")


def test_onnx_backend_needs_model_onnx(tmp_path: Path) -> None:
    out = save_bundle(str(tmp_path / "b"), tiny_model(), tiny_meta())
    with pytest.raises(BundleError, match="has no model.onnx"):
        Predictor.from_bundle(out, backend="onnx")


def test_tampered_model_onnx_fails_the_checksum(tmp_path: Path) -> None:
    copy = shutil.copytree(multilabel_onnx_bundle(), tmp_path / "b")
    graph = bytearray((copy / ONNX_FILE).read_bytes())
    graph[-5] ^= 0x01
    (copy / ONNX_FILE).write_bytes(bytes(graph))
    with pytest.raises(BundleError, match="sha256"):
        Predictor.from_bundle(str(copy), backend="onnx")
