"""The packaged ImageNet weights are real, and weights files fit into models safely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from tagmill.errors import InputError, StorageError
from tagmill.models import (
    PretrainedConfig,
    create_classifier,
    fit_state_dict,
    has_offline_weights,
    load_weights,
    offline_weights_path,
    pretrained_config,
    read_state_dict,
)

skimage_data = pytest.importorskip("skimage.data")

TABBY, EGYPTIAN_CAT, ESPRESSO = 281, 285, 967


def preprocess(photo: np.ndarray, cfg: PretrainedConfig) -> torch.Tensor:
    """Evaluation preprocessing: shorter side to size/crop_pct, center crop, normalise."""
    image = Image.fromarray(photo)
    scale = round(cfg.input_size / cfg.crop_pct) / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - cfg.input_size) // 2, (image.height - cfg.input_size) // 2
    image = image.crop((left, top, left + cfg.input_size, top + cfg.input_size))
    # contiguous NCHW: a permuted (channels-last) input took seconds on its first calls here
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float() / 255  # (3, H, W) in [0, 1]
    return (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    """The real ImageNet Lite0, loaded once for this module."""
    return create_classifier("efficientnet_lite0", 1000).eval()


def test_lite0_recognises_the_cat_and_the_espresso(lite0: nn.Module) -> None:
    cfg = pretrained_config("efficientnet_lite0")
    images = torch.stack([preprocess(skimage_data.chelsea(), cfg), preprocess(skimage_data.coffee(), cfg)])
    with torch.no_grad():
        probs = lite0(images).softmax(dim=-1)  # (2, 1000)
    cat, coffee = probs.argmax(dim=-1).tolist()
    assert TABBY <= cat <= EGYPTIAN_CAT
    assert coffee == ESPRESSO
    assert probs[1, ESPRESSO] > 0.8


def test_a_new_head_keeps_the_imagenet_backbone(lite0: nn.Module) -> None:
    model = create_classifier("efficientnet_lite0", 3)
    assert model.get_classifier().out_features == 3
    ours, imagenet = model.state_dict(), lite0.state_dict()
    for key in ("conv_stem.weight", "blocks.6.0.conv_pwl.weight", "bn2.running_var"):
        torch.testing.assert_close(ours[key], imagenet[key])


def test_packaged_weights_pair_by_order_with_every_shape_checked() -> None:
    path = offline_weights_path("efficientnet_lite0")
    assert path.name.endswith(".pth") and path.is_file()
    model = create_classifier("efficientnet_lite0", 1000, pretrained=False)
    report = fit_state_dict(model, read_state_dict(str(path)), source=str(path), by_order=True)
    assert report.by_order and report.skipped == () and report.loaded == 247  # 296 less 49 BN counters


def test_packaged_weights_of_another_network_are_refused() -> None:
    lite1 = read_state_dict(str(offline_weights_path("efficientnet_lite1")))
    model = create_classifier("efficientnet_lite0", 1000, pretrained=False)
    with pytest.raises(InputError, match="does not fit tf_efficientnet_lite0"):
        fit_state_dict(model, lite1, source="lite1.pth", by_order=True)


@pytest.mark.parametrize(("architecture", "size", "crop_pct"),
                         [("efficientnet_lite0", 224, 0.875), ("efficientnet_lite1", 240, 0.882),
                          ("efficientnet_lite2", 260, 0.89)])
def test_lite_configs_describe_the_packaged_weights(architecture: str, size: int, crop_pct: float) -> None:
    cfg = pretrained_config(architecture)
    assert has_offline_weights(architecture)
    assert (cfg.input_size, cfg.crop_pct, cfg.interpolation) == (size, crop_pct, "bicubic")
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5)
    assert cfg.architecture == "tf_" + architecture


def test_other_architectures_get_timms_defaults() -> None:
    cfg = pretrained_config("resnet34", pretrained=False)
    assert not has_offline_weights("resnet34")
    assert cfg.input_size == 224 and cfg.mean == pytest.approx((0.485, 0.456, 0.406))
    assert cfg.std == pytest.approx((0.229, 0.224, 0.225))
    assert pretrained_config("test_vit", pretrained=False).fixed_input_size
    assert cfg.to_dict()["architecture"] == "resnet34"
    with pytest.raises(InputError, match="unknown architecture"):
        pretrained_config("no_such_net", pretrained=False)


# -- local weights files, on a tiny model ------------------------------------------------


def tiny(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_classifier("test_resnet", num_classes, pretrained=False).eval()


def same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize(
    ("name", "save"),
    [
        ("w.safetensors", lambda sd, p: save_file(sd, p)),
        ("w.pth", lambda sd, p: torch.save(sd, p)),
        ("w.pt", lambda sd, p: torch.save({"state_dict": sd, "epoch": 3}, p)),
        ("ddp.pth", lambda sd, p: torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, p)),
    ],
)
def test_weights_files_load_into_the_same_architecture(tmp_path: Path, name: str, save) -> None:
    source = tiny(seed=1)
    path = str(tmp_path / name)
    save(source.state_dict(), path)
    model = create_classifier("test_resnet", 3, weights=path)
    assert same_outputs(model, source)


def test_a_head_of_another_size_is_replaced_and_reported(tmp_path: Path) -> None:
    source = tiny(num_classes=10, seed=1)
    path = str(tmp_path / "ten.safetensors")
    save_file(source.state_dict(), path)
    model = tiny(num_classes=3, seed=2)
    fresh_head = model.fc.weight.detach().clone()
    report = load_weights(model, path)
    assert report.skipped == ("fc.bias", "fc.weight") and not report.by_order
    torch.testing.assert_close(model.fc.weight, fresh_head)
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_foreign_key_names_pair_by_order() -> None:
    source = tiny(seed=1)
    tensors = [v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")]
    renamed = {f"tensor{i:03d}": v for i, v in enumerate(tensors)}  # another naming, same order
    model = tiny(seed=2)
    assert fit_state_dict(model, renamed, source="renamed").by_order
    assert same_outputs(model, source)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "effnet.pth")
    torch.save(create_classifier("test_efficientnet", 3, pretrained=False).state_dict(), path)
    with pytest.raises(InputError, match="does not fit test_resnet") as caught:
        create_classifier("test_resnet", 3, weights=path)
    assert "missing" in str(caught.value)


def test_a_pickled_module_is_refused_not_executed(tmp_path: Path) -> None:
    path = str(tmp_path / "whole_model.pth")
    torch.save(tiny(), path)
    with pytest.raises(InputError, match="not a plain state dict"):
        create_classifier("test_resnet", 3, weights=path)


@pytest.mark.parametrize(("name", "data"), [("junk.pth", b"not torch"), ("junk.safetensors", b"\x00" * 4)])
def test_unreadable_weights_files_are_input_errors(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match="cannot read weights"):
        read_state_dict(str(path))


def test_a_missing_weights_file_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not found"):
        create_classifier("test_resnet", 3, weights=str(tmp_path / "nope.pth"))
