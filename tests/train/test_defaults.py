"""What `tagmill train` does when left to itself: a converged head, thresholds tuned away
from the reported split, fine-tuning that can only help, a time budget, and resuming."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from tagmill.cli import app, parse_duration
from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.errors import InputError
from tagmill.evaluate import tune_thresholds
from tagmill.formats import SourceOptions
from tagmill.models import create_classifier
from tagmill.train.checkpoint import load_checkpoint
from tagmill.train.config import TrainConfig
from tagmill.train.loop import train
from tagmill.train.features import load_features
from tagmill.train.run_format import read_oof
from tests import images
from tests.conftest import COLOURS, make_colour_classes

REPO = Path(__file__).resolve().parents[2]
TINY = dict(backbone="test_efficientnet", pretrained=False, image_size=48, batch_size=8, workers=0)
TIMING = {"images_per_s", "seconds"}


def tag_images(root, count, seed):
    """Two-colour images tagged with their colours; every fourth image untagged (grey)."""
    rng = np.random.default_rng(seed)
    names, rows = list(COLOURS), []
    for i in range(count):
        tags = [] if i % 4 == 3 else sorted({names[i % 4], names[(i * 7 + seed) % 4]})
        left, right = (COLOURS[tags[0]], COLOURS[tags[-1]]) if tags else ((128, 128, 128),) * 2
        arr = np.zeros((40, 40, 3), np.int16)
        arr[:, :20], arr[:, 20:] = left, right
        arr = np.clip(arr + rng.integers(-40, 40, size=arr.shape), 0, 255).astype(np.uint8)
        images.write(root / f"{seed}-{i}.png", images.encode(Image.fromarray(arr), "PNG"))
        rows.append((f"{seed}-{i}", tags))
    return rows


def write_csv(path, rows):
    path.write_text("id,tags\n" + "".join(f'{i},"{", ".join(t)}"\n' for i, t in rows))


def rows_of(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def test_thresholds_never_see_the_reported_split(tmp_path):
    """Same training images, two validation sets with different labels: the thresholds
    (and the out-of-fold predictions they come from) are identical; the metrics are not."""
    src = tmp_path / "src"
    write_csv(src / "train.csv", tag_images(src, 48, seed=0))
    val = tag_images(src, 16, seed=1)
    write_csv(src / "val_a.csv", val)
    write_csv(src / "val_b.csv", [(i, []) if t else (i, ["red"]) for i, t in val])  # labels turned around
    options = dict(source=SourceOptions(images=str(src), suffix=".png"), val_fraction=0.0)
    runs = {}
    for name in ("a", "b"):
        import_dataset(str(src / "train.csv"), str(tmp_path / f"ds_{name}"),
                       ImportOptions(val_source=str(src / f"val_{name}.csv"), **options))
        train(str(tmp_path / f"ds_{name}"), str(tmp_path / name), TrainConfig(**TINY, folds=3))
        runs[name] = tmp_path / name
    thresholds = {n: json.loads((r / "thresholds.json").read_text()) for n, r in runs.items()}
    assert thresholds["a"] == thresholds["b"]
    probs, targets, folds = read_oof(str(runs["a"]))
    assert folds == 3 and len(targets) == 48  # out-of-fold over the 48 training images
    assert thresholds["a"] == pytest.approx(tune_thresholds(probs, targets.long(), min_positives=100).tolist())
    metrics = {n: json.loads((r / "metrics.json").read_text()) for n, r in runs.items()}
    assert metrics["a"]["result"]["headline"] != metrics["b"]["result"]["headline"]
    assert "out-of-fold predictions over the training split" in metrics["a"]["sources"]["thresholds"]
    report = (runs["a"] / "report.md").read_text()
    assert "## Where the numbers come from" in report and "which no model or threshold was fitted on" in report


def test_the_kept_model_is_never_worse_than_the_head_alone(colour_dataset, tmp_path):
    # an absurd learning rate wrecks the whole-network epochs; the head-only model stays
    config = TrainConfig(**TINY, unfrozen_epochs=2, lr=50.0, cache_views=1)
    result = train(colour_dataset, str(tmp_path / "run"), config)
    head, *unfrozen = result.history
    assert head["stage"] == "head" and [r["stage"] for r in unfrozen] == ["unfrozen", "unfrozen"]
    assert all(r["val_metric"] <= head["val_metric"] for r in unfrozen)
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert best["stage"] == "head" and result.best_metric == head["val_metric"]
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert final["result"]["headline"]["accuracy"] == pytest.approx(head["val_metric"])


def test_left_open_fine_tuning_stops_at_the_first_epoch_that_does_not_pay(colour_dataset, tmp_path):
    config = TrainConfig(**TINY, lr=50.0, cache_views=1, time_budget=3600)
    result = train(colour_dataset, str(tmp_path / "run"), config)
    stages = [r["stage"] for r in result.history]
    assert stages == ["head", "unfrozen"]  # the first unfrozen epoch was worse: no second one
    assert not result.history[1]["improved"]


def test_no_fine_tuning_without_being_asked_and_none_past_the_budget(colour_dataset, tmp_path):
    lines = []
    result = train(colour_dataset, str(tmp_path / "a"), TrainConfig(**TINY), log=lines.append)
    assert [r["stage"] for r in result.history] == ["head"]
    assert any("fine-tuning: off" in line for line in lines)
    lines.clear()
    result = train(colour_dataset, str(tmp_path / "b"), TrainConfig(**TINY, time_budget=0.001), log=lines.append)
    assert [r["stage"] for r in result.history] == ["head"]
    assert any("0 epoch(s) planned" in line for line in lines)


def test_one_image_per_class_falls_back_without_crashing(tmp_path):
    make_colour_classes(tmp_path / "src", 2)  # one training image per class, one for validation
    import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), ImportOptions(val_fraction=0.5))
    lines = []
    result = train(str(tmp_path / "ds"), str(tmp_path / "run"), TrainConfig(**TINY, time_budget=600), log=lines.append)
    assert any("too few to cross-validate" in line and "without cross-validation" in line for line in lines)
    assert all(np.isfinite(r["val_loss"]) for r in result.history)


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "10m", "1.5h")] == [90, 90, 600, 5400]
    for bad in ("", "soon", "-5m", "0s", "infm"):
        with pytest.raises(InputError):
            parse_duration(bad)


@pytest.fixture
def tiny_weights(tmp_path):
    """A weights file for the tiny test network: a 'pretrained' backbone the CLI can name."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    save_file(create_classifier("test_efficientnet", 3, pretrained=False).state_dict(), str(path))
    return str(path)


def kill_when(cmd, ready, timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_the_converged_head_is_fitted_and_judged_on_the_plain_images(colour_dataset, tmp_path, tiny_weights):
    """One cached view is the unaugmented image: runs that differ only in their seed (and
    so in any augmentation) cache the same features as view 1 of a two-view cache."""
    features = []
    for seed in (0, 1):
        config = TrainConfig(**{**TINY, "pretrained": True}, weights=tiny_weights, cache_views=1, seed=seed)
        train(colour_dataset, str(tmp_path / f"run{seed}"), config)
        features.append(load_features(str(tmp_path / f"run{seed}" / "features.safetensors")))
    (views0, val0), (views1, _) = features
    assert len(views0) == 1 and torch.equal(views0[0].features, views1[0].features)
    # the same pipeline as validation: a training image and its cached features
    config = TrainConfig(**{**TINY, "pretrained": True}, weights=tiny_weights, cache_views=2, seed=1)
    train(colour_dataset, str(tmp_path / "two"), config)
    two, _ = load_features(str(tmp_path / "two" / "features.safetensors"))
    assert torch.allclose(two[0].features, views0[0].features, atol=1e-5)
    assert not torch.allclose(two[1].features, views0[0].features, atol=1e-3)  # view 2 is augmented


@pytest.fixture(scope="module")
def fashion_dataset(tmp_path_factory):
    """Real images: the first 80 Fashion-MNIST pictures of the bundled sample (64 train / 16 val)."""
    root = tmp_path_factory.mktemp("fashion")
    sample = REPO / "sample_data" / "fashion-mnist"
    lines = (sample / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(lines[:81]) + "\n")
    import_dataset(str(root / "labels.csv"), str(root / "ds"),
                   ImportOptions(source=SourceOptions(images=str(sample / "images"), suffix=".png"), val_fraction=0.2,
                                 min_per_class=0))
    return str(root / "ds")


@pytest.mark.parametrize("stage", ["head", "unfrozen", "unfrozen on real images"])
def test_killed_in_either_stage_resumes_to_the_uninterrupted_result(colour_dataset, fashion_dataset, tmp_path, tiny_weights,
                                                                    stage):
    """kill -9 while the features are cached or the head fitted, or in the middle of a
    whole-network epoch (the first one's row written, the second one running)."""
    args = ["--backbone", "test_efficientnet", "--weights", tiny_weights, "--image-size", "64", "--batch-size", "8",
            "--workers", "0", "--epochs", "3"]
    dataset = fashion_dataset if stage.endswith("real images") else colour_dataset
    full = CliRunner().invoke(app, ["train", dataset, "--out", str(tmp_path / "full"), *args], catch_exceptions=False)
    assert full.exit_code == 0, full.output
    assert [r["stage"] for r in rows_of(tmp_path / "full")] == ["head", "unfrozen", "unfrozen", "unfrozen"]

    killed = tmp_path / "killed"
    metrics = killed / "metrics.jsonl"
    if stage == "head":  # the run directory exists, the head has not finished: caching or fitting
        ready = lambda: (killed / "config.json").exists()  # noqa: E731
    else:
        ready = lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2  # noqa: E731
    kill_when([sys.executable, "-m", "tagmill", "train", dataset, "--out", str(killed), *args], ready)
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    assert done == 0 if stage == "head" else 2 <= done < 4

    resumed = CliRunner().invoke(app, ["train", "--resume", str(killed)], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert rows_of(killed) == rows_of(tmp_path / "full")
    assert (killed / "thresholds.json").exists() is False  # single-label: no thresholds
