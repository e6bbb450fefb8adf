"""Plots render to PNGs of sensible size; copies land in test-artifacts/ for a human look."""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from tagmill.errors import InputError
from tagmill.evaluate import plot_confusion, plot_curves, plot_per_class_f1

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "evaluate"


def keep(path: Path) -> None:
    """Copy a rendered plot to test-artifacts/ (git-ignored) so it can be looked at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / path.name)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def history() -> list[dict]:
    rows = []
    for epoch in range(1, 5):  # fastai numbers each fit() from 1: the unfrozen stage restarts
        rows.append({"epoch": epoch, "stage": "frozen", "train_loss": 0.9 / epoch, "val_loss": 0.8 / epoch + 0.05,
                     "metric": "fbeta", "val_metric": 0.4 + 0.08 * epoch})
    for epoch in range(1, 4):
        rows.append({"epoch": epoch, "stage": "unfrozen", "train_loss": 0.2 / epoch, "val_loss": 0.22 + 0.01 * epoch,
                     "metric": "fbeta", "val_metric": 0.74 + 0.02 * epoch})
    rows[0]["val_loss"] = None  # a missing value leaves a gap, not a crash
    return rows


def test_curves(tmp_path):
    out = plot_curves(history(), str(tmp_path / "curves.png"))
    width, height = png_size(Path(out))
    assert (900 <= width <= 1100) and (350 <= height <= 500)
    keep(Path(out))


def test_curves_need_history(tmp_path):
    with pytest.raises(InputError):
        plot_curves([], str(tmp_path / "curves.png"))


def test_confusion_for_ten_classes(tmp_path):
    rng = random.Random(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    confusion = [[(40 + rng.randrange(20)) if i == j else rng.randrange(6) for j in range(10)] for i in range(10)]
    confusion[3] = [0] * 10  # a class with no validation sample
    out = tmp_path / "confusion.png"
    plot_confusion(confusion, classes, str(out))
    width, height = png_size(out)
    assert 600 <= width <= 900 and 550 <= height <= 800
    keep(out)


def test_confusion_with_many_long_names(tmp_path):
    rng = random.Random(1)
    classes = [f"{i:03d}.{name}" for i, name in enumerate(rng.choice(["ak47", "american-flag", "backpack",
               "baseball-bat", "chimp", "hot-air-balloon", "mountain-bike", "teddy-bear-extra-long-name"])
               for _ in range(50))]
    confusion = [[rng.randrange(30) if i == j else rng.randrange(2) for j in range(50)] for i in range(50)]
    out = tmp_path / "confusion-50.png"
    plot_confusion(confusion, classes, str(out))
    width, height = png_size(out)
    assert width <= 2500 and height <= 2300
    keep(out)


def test_confusion_shape_must_match_classes(tmp_path):
    with pytest.raises(InputError, match="does not match"):
        plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"], str(tmp_path / "c.png"))


def test_per_class_f1_for_183_tags(tmp_path):
    rng = random.Random(2)
    per_class = [{"class": f"tag_{i}" if i % 7 else f"a rather long tag name {i}", "f1": rng.random(),
                  "support": rng.randrange(1, 5000)} for i in range(183)]
    out = tmp_path / "per_class_f1-183.png"
    plot_per_class_f1(per_class, str(out))
    width, height = png_size(out)
    assert 800 <= width <= 900
    assert 183 * 15 <= height <= 183 * 25  # grows with the tags, ~20 px each
    keep(out)

    few = tmp_path / "per_class_f1-top20.png"
    plot_per_class_f1(per_class, str(few), top=20)
    assert png_size(few)[1] < 600
    keep(few)


def test_plots_leave_pyplot_alone(tmp_path):
    plot_per_class_f1([{"class": "a", "f1": 0.5, "support": 3}], str(tmp_path / "f1.png"))
    pyplot = sys.modules.get("matplotlib.pyplot")  # torchmetrics imports it; we never use it
    assert pyplot is None or pyplot.get_fignums() == []
