"""Explanations: the pretrained model's heat lies on the object it names, every backbone
family gives a heatmap over the decoded picture, ONNX bundles explain through their
torch weights, and bad requests are refused precisely."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagmill.bundle import WEIGHTS_FILE, BundleMeta, Predictor, save_bundle
from tagmill.bundle.explain import explain
from tagmill.bundle.format import build_model
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import InputError, UnreadableImageError
from tagmill.models import create_classifier
from tagmill.models.factory import pooling_kwargs
from tests import images
from tests.bundle import multilabel_onnx_bundle

skimage_data = pytest.importorskip("skimage.data")

#: ImageNet synsets: tabby cat (281) and espresso (967)
TABBY, ESPRESSO = "n02123045", "n07920052"
#: the scene: a grey 640x480 canvas, scikit-image's espresso photo on the left and its cat
#: (chelsea) on the right, each 320x213 in a band across the middle; the boxes are drawn
#: by hand around each photo (22% of the picture each)
CANVAS = (640, 480)
COFFEE_BOX, CAT_BOX = (0, 134, 320, 347), (320, 134, 640, 347)  # left, top, right, bottom


def _scene() -> Image.Image:
    canvas = Image.new("RGB", CANVAS, (128, 128, 128))
    canvas.paste(Image.fromarray(skimage_data.coffee()).resize((320, 213)), COFFEE_BOX[:2])
    canvas.paste(Image.fromarray(skimage_data.chelsea()).resize((320, 213)), CAT_BOX[:2])
    return canvas


def _share(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    left, top, right, bottom = box
    return float(heat[top:bottom, left:right].sum() / heat.sum())


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    """The real ImageNet EfficientNet-Lite0 as a 1000-class bundle (synset names)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    meta = BundleMeta("tf_efficientnet_lite0", "single", [info.index_to_label_name(i) for i in range(1000)],
                      Preprocess(224, "squish", interpolation="bicubic"))
    location = save_bundle(str(tmp_path_factory.mktemp("imagenet") / "bundle"),
                           create_classifier("efficientnet_lite0", 1000).eval(), meta)
    return Predictor.from_bundle(location)


def test_the_cat_heatmap_lies_on_the_cat_and_the_espresso_one_on_the_cup(imagenet: Predictor) -> None:
    found = explain(imagenet, images.encode(_scene(), "PNG"), classes=[TABBY, ESPRESSO])
    cat, coffee = found.heatmaps
    assert (cat.label, coffee.label) == (TABBY, ESPRESSO)
    assert cat.heat.shape == coffee.heat.shape == (CANVAS[1], CANVAS[0])
    # each box is 22% of the picture: most of the heat inside it is far from chance
    assert _share(cat.heat, CAT_BOX) > 0.5
    assert _share(coffee.heat, COFFEE_BOX) > 0.5
    assert _share(cat.heat, CAT_BOX) > 2 * _share(cat.heat, COFFEE_BOX)
    assert _share(coffee.heat, COFFEE_BOX) > 2 * _share(coffee.heat, CAT_BOX)
    # without classes asked, the predicted top class (a cat) is explained, on the cat
    top = explain(imagenet, _scene())
    assert [h.label for h in top.heatmaps] == [top.prediction.labels[0]]
    assert _share(top.heatmaps[0].heat, CAT_BOX) > 0.5
    assert top.heatmaps[0].score == pytest.approx(max(top.prediction.probabilities))


@pytest.mark.parametrize(("architecture", "pooling", "size"), [
    ("test_efficientnet", "levels", 64),  # training's default pooling: the head reads four levels
    ("test_efficientnet", "avg", 64),
    ("test_resnet", "levels", 64),
    ("mobilenetv3_small_050", "avgmax", 64),
    ("convnext_atto", "avg", 64),
    ("test_vit", "avg", 160),  # a ViT's tokens, laid back on their 10x10 grid
])
def test_every_backbone_family_gives_heat_over_the_decoded_picture(architecture: str, pooling: str, size: int) -> None:
    classes = [f"c{i}" for i in range(6)]
    meta = BundleMeta(architecture, "multi", classes, Preprocess(size, "squish"),
                      model_kwargs=pooling_kwargs(architecture, pooling))
    torch.manual_seed(0)
    predictor = Predictor(build_model(meta), meta)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    found = explain(predictor, picture, classes=classes)
    assert [h.label for h in found.heatmaps] == classes
    for heatmap in found.heatmaps:
        assert heatmap.heat.shape == (50, 70) and heatmap.heat.dtype == np.float32
        assert np.isfinite(heatmap.heat).all() and 0 <= heatmap.heat.min() and heatmap.heat.max() <= 1
    # a random head has no positive evidence for some classes (Grad-CAM's ReLU gives zero
    # heat), but not for all of them, and the heat varies over the picture
    assert any(np.ptp(h.heat) > 0.5 for h in found.heatmaps)
    assert found.heatmaps[0].overlay(found.image).size == (70, 50)


def test_a_centre_crop_leaves_what_it_cut_off_cold_and_a_letterbox_maps_onto_the_picture() -> None:
    torch.manual_seed(0)
    crop = BundleMeta("test_efficientnet", "single", ["a", "b"], Preprocess(64, "crop", crop_pct=1.0))
    model = build_model(crop)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 120, 3), dtype=np.uint8))
    (heat,) = [h.heat for h in explain(Predictor(model, crop), picture, classes=["a"]).heatmaps]
    assert heat.shape == (60, 120)
    assert heat[:, :28].max() == 0 and heat[:, 92:].max() == 0  # the centre 60x60 was all the model saw
    assert heat[:, 30:90].max() > 0
    pad = BundleMeta("test_efficientnet", "single", ["a", "b"], Preprocess(64, "pad"))
    (padded,) = [h.heat for h in explain(Predictor(model, pad), picture, classes=["a"]).heatmaps]
    assert padded.shape == (60, 120)


def test_an_onnx_predictor_explains_through_the_bundles_torch_weights(tmp_path: Path) -> None:
    bundle = multilabel_onnx_bundle()
    photo = images.jpeg_bytes(80, 50, seed=3)
    by_torch = explain(Predictor.from_bundle(bundle), photo)
    by_onnx = explain(Predictor.from_bundle(bundle, backend="onnx", intra_op_threads=1), photo)
    assert [h.label for h in by_onnx.heatmaps] == [h.label for h in by_torch.heatmaps] == ["dog", "owl"]  # its tags
    for a, b in zip(by_onnx.heatmaps, by_torch.heatmaps, strict=True):
        np.testing.assert_allclose(a.heat, b.heat, atol=1e-4)
    assert by_onnx.prediction.labels == ["dog", "owl"]
    # an ONNX graph alone cannot be explained: no gradients; the message says what is missing
    copy = shutil.copytree(bundle, tmp_path / "onnx-only")
    (copy / WEIGHTS_FILE).unlink()
    onnx_only = Predictor.from_bundle(str(copy), backend="onnx", intra_op_threads=1)
    with pytest.raises(InputError, match="has no torch weights"):
        explain(onnx_only, photo)


def test_an_unknown_class_and_an_unreadable_image_are_refused_precisely() -> None:
    predictor = Predictor.from_bundle(multilabel_onnx_bundle())
    with pytest.raises(InputError, match="no class 'zebra' in this model") as info:
        explain(predictor, images.jpeg_bytes(), classes=["cat", "zebra"])
    assert "cat, dog, owl" in (info.value.hint or "")
    with pytest.raises(UnreadableImageError):
        explain(predictor, images.truncated_jpeg_bytes())
    with pytest.raises(UnreadableImageError):
        explain(predictor, b"<html>not an image</html>")
