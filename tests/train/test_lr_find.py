"""The learning-rate finder: the sweep, fastai's valley rule, the head on cached features,
and ``tagmill lr-find`` end to end on tiny datasets."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tagmill.cli import app
from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.errors import DatasetError, InputError
from tagmill.evaluate import plot_lr_sweep
from tagmill.train.config import TrainConfig
from tagmill.train.lr_find import DEFAULT_LR, LRSweep, _valley, find_lr, sweep_head, sweep_lr
from tests.conftest import make_colour_classes

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "train"
TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8", "--workers", "0"]
runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output.replace("\n", "")  # rich folds long lines (paths) at the console's width


def noisy_quadratic(seed: int = 0):
    """SGD on (w - t)^2, t ~ N(0, 1) per batch: stable for lr < 1, divergent above."""
    rng = random.Random(seed)
    w = [10.0]

    def step(lr: float) -> float:
        t = rng.gauss(0.0, 1.0)
        loss = (w[0] - t) ** 2
        w[0] -= lr * 2 * (w[0] - t)
        return loss

    return step


def separable(n: int = 200, d: int = 16, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=generator) * 3  # (C, D)
    targets = torch.randint(0, classes, (n,), generator=generator)  # (N,)
    return centres[targets] + torch.randn(n, d, generator=generator), targets  # (N, D), (N,)


def assert_usable(sweep: LRSweep) -> None:
    assert math.isfinite(sweep.suggestion) and sweep.suggestion > 0
    assert sweep.message and len(sweep.lrs) == len(sweep.losses) == len(sweep.raw_losses)
    assert all(math.isfinite(v) for v in sweep.lrs + sweep.losses + sweep.raw_losses)


# ---------------------------------------------------------------- the sweep


def test_quadratic_suggestion_is_where_the_loss_falls():
    sweep = sweep_lr(noisy_quadratic())
    assert_usable(sweep)
    assert sweep.method == "valley"
    # lrs grow exponentially from 1e-7 and the sweep stopped when SGD blew up (lr > 1)
    assert sweep.lrs[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(sweep.lrs, sweep.lrs[1:]))
    assert "diverged" in sweep.message and 1.0 < sweep.lrs[-1] < 10.0
    # stable (lr < 1) and large enough to make progress: the loss falls a lot after it
    assert 1e-3 < sweep.suggestion < 1.0
    at = sweep.lrs.index(sweep.suggestion)
    assert min(sweep.raw_losses[at:]) < sweep.raw_losses[at] / 10


def test_suggestion_lies_on_the_falling_stretch_of_a_loss_shape():
    def shape(lr: float) -> float:  # flat until 1e-4, falls until 1e-1, then explodes
        x = math.log10(lr)
        return 2.0 if x < -4 else 2.0 - 1.8 * (x + 4) / 3 if x < -1 else 0.2 * 10 ** (2 * (x + 1))

    sweep = sweep_lr(shape)
    assert sweep.method == "valley" and 1e-4 < sweep.suggestion < 1e-1


def test_smoothing_is_fastais_bias_corrected_average():
    raw = [3.0, 1.0, 2.0, 5.0] * 3
    asked: list[float] = []

    def step(lr: float) -> float:
        asked.append(lr)
        return raw[len(asked) - 1]

    sweep = sweep_lr(step, num_steps=12, smoothing=0.9)
    assert asked == pytest.approx(list(np.geomspace(1e-7, 10.0, 12)))
    assert sweep.raw_losses == raw and sweep.losses[0] == 3.0  # no pull towards 0 at the start
    average = 0.0
    for i, (loss, smoothed) in enumerate(zip(raw, sweep.losses)):
        average = 0.9 * average + 0.1 * loss
        assert smoothed == pytest.approx(average / (1 - 0.9 ** (i + 1)))


def test_divergence_stops_the_sweep_early():
    calls: list[float] = []

    def step(lr: float) -> float:
        calls.append(lr)
        return 1.0 if lr < 1e-3 else 1.0 + 1e4 * (lr - 1e-3)

    sweep = sweep_lr(step, diverge=4.0)
    assert len(calls) == len(sweep.lrs) < 100 and sweep.lrs[-1] < 1e-2
    assert sweep.losses[-1] > 4 * min(sweep.losses) and "diverged" in sweep.message
    assert_usable(sweep)


@pytest.mark.parametrize(
    ("step", "why"),
    [
        (lambda lr: 0.7, "did not change"),
        (lambda lr: math.nan, "after 0 steps"),
        (lambda lr: math.inf, "not finite"),
        (lambda lr: 1.0 if lr < 1.6e-7 else math.nan, "after 3 steps"),
        (lambda lr: 1.0 + math.log10(lr / 1e-8), "never fell"),  # only ever rises (slowly: no divergence)
    ],
)
def test_degenerate_sweeps_fall_back_with_a_reason(step, why):
    sweep = sweep_lr(step, fallback_lr=3e-3)
    assert sweep.method == "fallback" and sweep.suggestion == 3e-3
    assert why in sweep.message and "3.0e-03" in sweep.message
    assert_usable(sweep)


def test_a_nan_late_in_the_sweep_keeps_the_curve_before_it():
    sweep = sweep_lr(lambda lr: math.nan if lr > 1e-1 else 2.0 - 0.1 * math.log10(lr / 1e-7) ** 1.5)
    assert sweep.method != "fallback" and "not finite at lr" in sweep.message
    assert_usable(sweep)
    assert sweep.lrs[-1] <= 1e-1


def test_bad_sweep_settings_are_input_errors():
    for bad in ({"start": 0.0}, {"start": 1.0, "end": 1e-3}, {"num_steps": 5}, {"smoothing": 1.0},
                {"diverge": 1.0}, {"fallback_lr": math.nan}):
        with pytest.raises(InputError):
            sweep_lr(lambda lr: 1.0, **bad)


def fastai_valley(lrs: list[float], losses: list[float]) -> float:
    """fastai.callback.schedule.valley, verbatim but for the clamp of a -1 start (see _valley)."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if (losses[i] < losses[j]) and (lds[i] < lds[j] + 1):
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    max_start = max(max_start, 0)
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx])


def test_valley_matches_fastais_definition():
    rng = np.random.default_rng(0)
    for n in (12, 40, 85):
        for _ in range(30):
            losses = np.cumsum(rng.normal(0, 1, n)) + rng.normal(0, 0.5, n)  # (n,) random walks
            lrs = np.geomspace(1e-6, 1.0, n)
            index, _ = _valley(losses)
            assert lrs[index] == fastai_valley(list(lrs), list(losses))


# ---------------------------------------------------------------- the head on cached features


def test_head_sweep_on_separable_features():
    features, targets = separable()
    head = torch.nn.Linear(16, 3)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    sweep = sweep_head(features, targets, task="single", head=head, batch_size=32)
    assert_usable(sweep)
    assert sweep.method in ("valley", "steep") and 1e-7 < sweep.suggestion < 10.0
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # the caller's head is untouched
    assert sweep_head(features, targets, task="single", head=head, batch_size=32) == sweep  # same seed, same sweep
    assert sweep_head(features, targets, task="single", head=head, batch_size=32, seed=1).raw_losses != sweep.raw_losses


def test_head_sweep_cycles_over_a_small_set_and_does_multi_label():
    features, classes = separable(n=40, classes=4)
    targets = torch.nn.functional.one_hot(classes, 4).float()  # (N, C) multi-hot
    targets[::3, 0] = 1.0  # a second tag on some
    sweep = sweep_head(features, targets, task="multi", head=torch.nn.Linear(16, 4), batch_size=16)
    assert_usable(sweep)
    assert len(sweep.lrs) > 40 // 16  # many more steps than batches in one pass
    assert sweep.method != "fallback" and 1e-7 < sweep.suggestion < 10.0


def test_head_sweep_on_too_few_images_falls_back():
    features, targets = separable(n=3)
    sweep = sweep_head(features, targets, task="single", head=torch.nn.Linear(16, 3), fallback_lr=DEFAULT_LR)
    assert sweep.method == "fallback" and sweep.suggestion == DEFAULT_LR
    assert "only 3 training images" in sweep.message and "5.0e-03" in sweep.message
    with pytest.raises(InputError):
        sweep_head(features, targets[:2], task="single", head=torch.nn.Linear(16, 3))
    with pytest.raises(InputError):
        sweep_head(features, targets, task="regression", head=torch.nn.Linear(16, 3))  # type: ignore[arg-type]


# ---------------------------------------------------------------- datasets and the CLI


def test_cli_writes_a_readable_plot_and_a_finite_suggestion(colour_dataset, tmp_path):
    result = run("lr-find", colour_dataset, "--out", str(tmp_path / "lr"), *TINY, "--steps", "60")
    assert "suggested lr" in result and "lr_find.png" in result
    with Image.open(tmp_path / "lr" / "lr_find.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
    saved = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert math.isfinite(saved["suggestion"]) and saved["suggestion"] > 0
    assert saved["method"] in result and saved["message"]
    assert 10 <= len(saved["lrs"]) == len(saved["losses"]) <= 60
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "lr" / "lr_find.png", ARTIFACTS / "lr_find.png")


def test_one_image_per_class_falls_back_with_a_message(tmp_path):
    make_colour_classes(tmp_path / "src", 1)
    import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), ImportOptions(val_fraction=0.0))
    result = run("lr-find", str(tmp_path / "ds"), "--out", str(tmp_path / "lr"), *TINY)
    assert "fallback" in result and "only 3 training images" in result
    saved = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert saved["method"] == "fallback" and saved["suggestion"] == DEFAULT_LR and saved["lrs"] == []
    with Image.open(tmp_path / "lr" / "lr_find.png") as image:
        assert image.format == "PNG"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "lr" / "lr_find.png", ARTIFACTS / "lr_find_fallback.png")


def test_the_fallback_is_the_configured_lr(tmp_path):
    make_colour_classes(tmp_path / "src", 2)
    import_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), ImportOptions(val_fraction=0.0))
    config = TrainConfig(backbone="test_efficientnet", pretrained=False, image_size=48, batch_size=8, workers=0, lr=2e-2)
    sweep = find_lr(str(tmp_path / "ds"), str(tmp_path / "lr"), config)
    assert sweep.method == "fallback" and sweep.suggestion == 2e-2 and "only 6 training images" in sweep.message


def test_missing_dataset_and_bad_options_are_clear_errors(colour_dataset, tmp_path):
    missing = run("lr-find", str(tmp_path / "nowhere"), "--out", str(tmp_path / "lr"), *TINY, code=DatasetError.exit_code)
    assert "not a tagmill dataset" in missing
    with pytest.raises(DatasetError):
        find_lr(str(tmp_path / "nowhere"), str(tmp_path / "lr"), TrainConfig())
    bad = run("lr-find", colour_dataset, "--out", str(tmp_path / "lr"), *TINY, "--start-lr", "1", "--end-lr", "0.1",
              code=InputError.exit_code)
    assert "start lr" in bad and not (tmp_path / "lr").exists()


def test_plot_of_a_fallback_with_a_curve_and_of_an_exploding_batch(tmp_path):
    flat = sweep_lr(lambda lr: 0.7, fallback_lr=1e-2)  # a curve, and a suggestion it does not bear out
    exploding = LRSweep([1e-4, 1e-3, 1e-2], [1.0, 0.8, 0.9], [1.0, 0.5, 1e9], 1e-3, "steep", "…")
    for name, sweep in (("flat", flat), ("exploding", exploding)):
        out = plot_lr_sweep(sweep, str(tmp_path / f"{name}.png"))
        with Image.open(out) as image:
            assert image.format == "PNG" and image.size[0] > 400
