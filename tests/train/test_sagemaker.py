import json

import pytest

from tagmill.errors import InputError
from tagmill.train.config import TrainConfig
from tagmill.train.sagemaker import config_from_hyperparameters


def write(tmp_path, params):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps(params))
    return str(path)


def test_seed_003_hyperparameters_map_onto_training_options(colour_dataset, tmp_path, monkeypatch):
    messages = []
    hp = {
        "num_layers": "18", "use_pretrained_model": "1", "image_shape": "3,224,224", "num_classes": "3",
        "num_training_samples": "48", "mini_batch_size": "16", "epochs": "6", "learning_rate": "0.01",
        "top_k": "2", "precision_dtype": "float32", "augmentation_type": "crop_color", "optimizer": "sgd",
    }
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "resnet18.pth").write_bytes(b"")  # where TAGMILL_WEIGHTS_DIR points
    monkeypatch.setenv("TAGMILL_WEIGHTS_DIR", str(tmp_path / "w"))
    options = config_from_hyperparameters(write(tmp_path, hp), colour_dataset, log=messages.append)
    assert options["backbone"] == "resnet18" and options["pretrained"] is True
    assert options["weights"].endswith("resnet18.pth")
    assert any("optimizer" in m for m in messages)
    assert (options["frozen_epochs"], options["unfrozen_epochs"]) == (2, 4)
    assert (options["batch_size"], options["lr"], options["image_size"], options["top_k"]) == (16, 0.01, 224, 2)
    assert options["augmentation"] == "crop_color" and options["precision"] == "fp32"
    TrainConfig.from_dict(options)  # a valid configuration


def test_local_resnet_weights_are_used_when_present(colour_dataset, tmp_path, monkeypatch):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "resnet34.safetensors").write_bytes(b"")
    monkeypatch.setenv("TAGMILL_WEIGHTS_DIR", str(tmp_path / "w"))
    options = config_from_hyperparameters(write(tmp_path, {"num_layers": 34, "use_pretrained_model": 1}), colour_dataset, log=lambda m: None)
    assert options["backbone"] == "resnet34" and options["weights"].endswith("resnet34.safetensors")


def test_from_scratch_and_checks_against_the_data(colour_dataset, tmp_path):
    options = config_from_hyperparameters(write(tmp_path, {"num_layers": 50, "use_pretrained_model": 0, "epochs": 3}), colour_dataset, log=lambda m: None)
    assert options == {"backbone": "resnet50", "pretrained": False, "frozen_epochs": 0, "unfrozen_epochs": 3}
    for bad in ({"num_classes": 4}, {"num_training_samples": 1}, {"image_shape": "3,224,200"},
                {"num_layers": 19}, {"precision_dtype": "int8"}, {"learning_rat": 0.1}):
        with pytest.raises(InputError):
            config_from_hyperparameters(write(tmp_path, bad), colour_dataset, log=lambda m: None)


def test_the_default_pretrained_backbone_spends_a_third_of_the_epochs_on_the_head(colour_dataset, tmp_path):
    """use_pretrained_model=1 without num_layers: tagmill's own pretrained backbone, and
    SageMaker's epochs split as for a named one."""
    options = config_from_hyperparameters(write(tmp_path, {"use_pretrained_model": "1", "epochs": "3"}), colour_dataset,
                                          log=lambda m: None)
    assert "backbone" not in options and options.get("pretrained", True) is True
    assert (options["frozen_epochs"], options["unfrozen_epochs"]) == (1, 2)
