"""Architecture names and the classifier factory, on timm's tiny test models."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

from tagmill.errors import InputError
from tagmill.models import (
    DEFAULT_ARCHITECTURE,
    check_image_size,
    create_classifier,
    param_groups,
    registered_architectures,
    resolve_architecture,
)


def test_aliases_name_the_tf_ports_of_efficientnet_lite() -> None:
    assert DEFAULT_ARCHITECTURE == "efficientnet_lite0"
    assert resolve_architecture("efficientnet_lite0") == "tf_efficientnet_lite0"
    assert resolve_architecture("efficientnet_lite2") == "tf_efficientnet_lite2"
    assert resolve_architecture("resnet34") == "resnet34"


def test_registered_architectures_include_the_tiny_test_models() -> None:
    names = registered_architectures()
    assert names[:3] == ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    assert {"test_efficientnet", "test_resnet", "test_vit"} <= set(names)


def test_unknown_architecture_suggests_close_names() -> None:
    with pytest.raises(InputError) as caught:
        resolve_architecture("resnet43")
    assert caught.value.exit_code == 2
    assert "unknown architecture 'resnet43'" in str(caught.value)
    assert "resnet34" in caught.value.hint


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, True])
def test_num_classes_must_be_a_positive_integer(num_classes: object) -> None:
    with pytest.raises(InputError, match="num_classes"):
        create_classifier("test_resnet", num_classes, pretrained=False)  # type: ignore[arg-type]


def test_drop_rate_is_checked_and_passed_to_timm() -> None:
    with pytest.raises(InputError, match="drop_rate"):
        create_classifier("test_resnet", 3, pretrained=False, drop_rate=1.0)
    assert create_classifier("test_resnet", 3, pretrained=False, drop_rate=0.25).drop_rate == 0.25


def test_a_bundle_rebuilds_the_classifier_with_plain_timm() -> None:
    model = create_classifier("efficientnet_lite0", 4, pretrained=False).eval()
    architecture = model.pretrained_cfg["architecture"]
    assert architecture == "tf_efficientnet_lite0"  # the resolved name, not the alias
    rebuilt = timm.create_model(architecture, pretrained=False, num_classes=4).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("architecture", registered_architectures())
def test_every_registered_architecture_classifies_tiny_input(architecture: str) -> None:
    torch.manual_seed(0)
    model = create_classifier(architecture, 5, pretrained=False)
    check_image_size(architecture, 64)
    with torch.no_grad():
        logits = model.eval()(torch.randn(2, 3, 64, 64))  # (B, num_classes)
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()

    groups = param_groups(model, 1e-3, weight_decay=0.01)
    grouped = [id(p) for group in groups for p in group["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped))  # nothing twice
    assert sorted(grouped) == sorted(trainable)  # nothing left out
    assert max(g["lr"] for g in groups) == pytest.approx(1e-3)
    assert min(g["lr"] for g in groups) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("architecture", "size", "words"),
    [
        ("vit_base_patch16_224", 64, "doesn't match model (224)"),  # fixed position embeddings
        ("test_vit", 20, "divisible by patch size"),
    ],
)
def test_image_sizes_an_architecture_cannot_take_are_refused(architecture: str, size: int, words: str) -> None:
    with pytest.raises(InputError) as caught:
        check_image_size(architecture, size)
    assert f"{architecture} cannot classify {size}x{size} images" in str(caught.value)
    assert words in str(caught.value)


def test_image_size_must_be_positive() -> None:
    with pytest.raises(InputError, match="image size"):
        check_image_size("test_resnet", 0)


def test_loading_weights_is_logged(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    source = create_classifier("test_resnet", 3, pretrained=False)
    path = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="tagmill.models"):
        create_classifier("test_resnet", 7, weights=str(path))
    assert "new 7-class head, not loaded: fc.bias, fc.weight" in caplog.text
