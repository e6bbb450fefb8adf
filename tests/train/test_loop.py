import json

import pytest
import torch

from tagmill.errors import InputError
from tagmill.train.checkpoint import load_checkpoint
from tagmill.train.config import TrainConfig
from tagmill.train.loop import train

TINY = dict(backbone="test_efficientnet", pretrained=False, image_size=48, batch_size=8, workers=0, lr=1e-2)


def test_two_stage_training_writes_metrics_and_checkpoints(colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = train(colour_dataset, str(run_dir), TrainConfig(**TINY, frozen_epochs=2, unfrozen_epochs=2, cache_views=2))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["frozen", "frozen", "unfrozen", "unfrozen"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert all(r["metric"] == "accuracy" and 0 <= r["val_metric"] <= 1 for r in rows)
    assert result.best_metric == max(r["val_metric"] for r in rows)
    best = load_checkpoint(str(run_dir / "best.pt"))
    assert best["best_metric"] == result.best_metric and best["classes"] == ["blue", "green", "red"]
    assert (run_dir / "features.safetensors").exists()
    # the colours are easy: training must beat chance (1/3) clearly
    assert result.best_metric >= 0.75


def test_same_seed_same_run_and_resuming_a_finished_run_changes_nothing(colour_dataset, tmp_path):
    config = TrainConfig(**TINY, frozen_epochs=1, unfrozen_epochs=1, cache_views=1)
    first = train(colour_dataset, str(tmp_path / "a"), config)
    second = train(colour_dataset, str(tmp_path / "b"), config)
    same = [r["val_loss"] for r in second.history]
    # bit for bit on a CPU; cuDNN's backward kernels add in no fixed order (~1e-7 apart on an H200)
    assert [r["val_loss"] for r in first.history] == (pytest.approx(same, rel=1e-5) if torch.cuda.is_available() else same)
    resumed = train(None, str(tmp_path / "a"), resume=True)
    assert resumed.history == first.history


def test_patience_stops_early(colour_dataset, tmp_path):
    config = TrainConfig(**{**TINY, "lr": 1e-9}, frozen_epochs=6, unfrozen_epochs=0, cache_views=1, patience=1)
    result = train(colour_dataset, str(tmp_path / "run"), config)
    assert len(result.history) < 6


def test_bad_requests_fail_before_any_work(colour_dataset, tmp_path):
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: refused with or without GPUs
    with pytest.raises(InputError, match="no CUDA GPU"):
        train(colour_dataset, str(tmp_path / "gpu"), TrainConfig(**TINY, device=absent))
    with pytest.raises(InputError):
        train(colour_dataset, str(tmp_path / "arch"), TrainConfig(**{**TINY, "backbone": "resnet43"}))
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "arch").exists()
    with pytest.raises(InputError, match="not a training run"):
        train(None, str(tmp_path / "nothing"), resume=True)


def test_bf16_autocast_and_label_smoothing_run(colour_dataset, tmp_path):
    config = TrainConfig(**TINY, frozen_epochs=1, unfrozen_epochs=1, cache_views=1, precision="bf16", label_smoothing=0.1)
    result = train(colour_dataset, str(tmp_path / "run"), config)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in result.history)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(InputError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    for bad in ({"precision": "fp8"}, {"resize_method": "zoom"}, {"frozen_epochs": 0, "unfrozen_epochs": 0}, {"batch_size": 0}):
        with pytest.raises(InputError):
            TrainConfig(**bad)


@pytest.mark.parametrize("multi", [False, True])
def test_the_head_loss_over_train_in_chunks_is_the_one_call_loss(multi):
    """mean_loss takes the loss over the training cache a chunk of rows at a time (no
    (N, C) logits): one chunk is the single call's number exactly, several agree with it
    to float rounding, for both losses (mean over rows; BCE also over tags)."""
    from tagmill.train.loop import mean_loss

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1000, 16, generator=generator)
    targets = ((torch.rand(1000, 5, generator=generator) < 0.3).float() if multi
               else torch.randint(0, 5, (1000,), generator=generator))
    classifier = torch.nn.Linear(16, 5)
    loss_fn = torch.nn.BCEWithLogitsLoss() if multi else torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    with torch.inference_mode():
        whole = loss_fn(classifier(features), targets).item()
        assert mean_loss(loss_fn, classifier, features, targets, torch.device("cpu"), rows=1000) == whole
        assert mean_loss(loss_fn, classifier, features, targets, torch.device("cpu"), rows=64) == pytest.approx(whole, rel=1e-6)
