"""Pretrained weights from a Hugging Face hub cache, resolved in one order, never swapped.

The caches are built by the tests (``tests/hub_cache.py``: timm's own ``save_for_hf``
files in huggingface_hub's cache layout) and read through huggingface_hub with
``HF_HUB_OFFLINE=1`` (conftest), as on an offline machine whose cache was copied over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tagmill.errors import InputError, WeightsNotFoundError
from tagmill.models import create_classifier, pretrained_config, resolve_architecture, resolve_weights
from tagmill.models.weights import head_keys
from tagmill.train.config import TrainConfig
from tagmill.train.sagemaker import config_from_hyperparameters
from tests.hub_cache import add_timm_repo

#: preprocessing no timm default has, so a test can tell it came from the cache's config.json
ODD_MEAN, ODD_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def body_matches(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    head = head_keys(model)
    state = model.state_dict()
    body = [key for key in saved if key not in head and not key.endswith("num_batches_tracked")]
    return bool(body) and all(torch.equal(state[key], saved[key]) for key in body)


def test_timm_weights_and_their_preprocessing_come_from_the_hub_cache(hub: Path) -> None:
    saved = add_timm_repo(hub, "test_resnet.r160_in1k", pretrained_cfg={"mean": ODD_MEAN, "std": ODD_STD})

    source = resolve_weights("test_resnet")  # untagged: timm's default tag, r160_in1k
    assert source.kind == "hub" and source.location.startswith(str(hub))
    cfg = pretrained_config("test_resnet")
    assert (cfg.mean, cfg.std, cfg.input_size, cfg.interpolation) == (ODD_MEAN, ODD_STD, 160, "bilinear")
    assert pretrained_config("test_resnet", pretrained=False).mean != ODD_MEAN  # timm's own default

    model = create_classifier("test_resnet", 3, pooling="avg")
    assert body_matches(model, saved)
    assert model.get_classifier().out_features == 3  # the 1000-class head was not loaded


def test_tagged_and_hf_hub_names(hub: Path) -> None:
    saved = add_timm_repo(hub, "test_resnet.r160_in1k")
    assert resolve_architecture("test_resnet.r160_in1k") == "test_resnet.r160_in1k"
    assert resolve_architecture("hf-hub:timm/test_resnet.r160_in1k") == "test_resnet.r160_in1k"
    assert body_matches(create_classifier("hf-hub:timm/test_resnet.r160_in1k", 2, pooling="avg"), saved)

    # a user's own repository: the architecture comes from its config.json, the weights from it
    own = add_timm_repo(hub, "test_resnet.r160_in1k", repo="someone/posters-net", seed=7,
                        pretrained_cfg={"mean": ODD_MEAN})
    assert resolve_architecture("hf-hub:someone/posters-net") == "test_resnet.r160_in1k"
    assert pretrained_config("hf-hub:someone/posters-net").mean == ODD_MEAN
    model = create_classifier("hf-hub:someone/posters-net", 2, pooling="avg")
    assert body_matches(model, own) and not body_matches(model, saved)

    with pytest.raises(InputError, match="no pretrained tag 'nope' for resnet50") as caught:
        resolve_architecture("resnet50.nope")
    assert "a1_in1k" in str(caught.value)  # the tags that exist are listed
    with pytest.raises(InputError, match="hf-hub:ORG/NAME"):
        resolve_architecture("hf-hub:just-a-name")


def test_missing_weights_say_what_was_tried_and_how_to_fix_it(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        create_classifier("test_vit", 3)
    text = str(caught.value)
    assert caught.value.exit_code == 9 and isinstance(caught.value, InputError)
    assert str(hub) in text and "timm/test_vit.r160_in1k" in text and "HF_HUB_OFFLINE" in text
    assert "hf download timm/test_vit.r160_in1k" in text and "--weights" in text
    with pytest.raises(WeightsNotFoundError, match="configuration of timm/absent"):
        resolve_architecture("hf-hub:timm/absent")

    # downloads allowed but the hub unreachable: one refused connection ends it (no retries)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(WeightsNotFoundError, match=r"cannot connect to 127\.0\.0\.1:9"):
        resolve_weights("test_efficientnet")


def test_a_corrupt_or_misfitting_cached_file_is_named(hub: Path) -> None:
    add_timm_repo(hub, "test_resnet.r160_in1k")
    weights = resolve_weights("test_resnet").location
    Path(weights).write_bytes(b"\x00" * 64)  # a download cut short
    with pytest.raises(InputError, match=f"cannot read weights from {weights}"):
        create_classifier("test_resnet", 3)

    # weights of another network filed under this name
    other = add_timm_repo(hub, "test_efficientnet.r160_in1k")
    assert other
    target = hub / "models--timm--test_vit.r160_in1k"
    (hub / "models--timm--test_efficientnet.r160_in1k").rename(target)
    with pytest.raises(InputError, match=r"does not fit test_vit") as caught:
        create_classifier("test_vit", 3)
    assert str(target) in str(caught.value)


def test_sagemaker_resnet_depth_means_that_resnet(colour_dataset: str, hub: Path, tmp_path: Path) -> None:
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps({"num_layers": "50", "use_pretrained_model": "1", "epochs": "3"}))
    with pytest.raises(WeightsNotFoundError, match="resnet50"):  # no substitute: a clear stop
        config_from_hyperparameters(str(hp), colour_dataset, log=lambda m: None)

    saved = add_timm_repo(hub, "resnet50.a1_in1k")
    messages: list[str] = []
    options = config_from_hyperparameters(str(hp), colour_dataset, log=messages.append)
    assert (options["backbone"], options["pretrained"]) == ("resnet50", True)
    assert (options["frozen_epochs"], options["unfrozen_epochs"]) == (1, 2)
    assert any(str(hub) in m for m in messages)
    config = TrainConfig.from_dict(options)
    assert body_matches(create_classifier(config.backbone, 3, pooling="avg"), saved)


def test_a_fixed_size_vit_is_fed_its_own_size_whatever_the_images(colour_dataset: str) -> None:
    from tagmill.dataset.manifest import load_manifest
    from tagmill.train.loop import choose_open_settings

    messages: list[str] = []
    manifest = load_manifest(colour_dataset)  # 40-px images: a CNN would get a smaller input
    vit = choose_open_settings(colour_dataset, manifest,
                               TrainConfig(backbone="vit_small_patch16_224", pretrained=False), messages.append)
    assert vit.image_size == 224 and any("the only size vit_small_patch16_224 takes" in m for m in messages)
    cnn = choose_open_settings(colour_dataset, manifest, TrainConfig(backbone="resnet18", pretrained=False), messages.append)
    assert cnn.image_size < 224
