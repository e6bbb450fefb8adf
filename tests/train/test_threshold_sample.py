"""Threshold tuning over a large train split keeps only the rows cross-validation draws
(plus the moments over all): the same thresholds as holding every row."""

from __future__ import annotations

import json

import pytest
import torch

import tagmill.train.features as features_module
import tagmill.train.head_fit as head_fit
from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.objective import objective
from tagmill.train.config import TrainConfig
from tagmill.train.features import extract_features, extract_sample
from tagmill.train.head_fit import Population, RunningMoments, _moments, cv_rows, fit_head
from tagmill.train.loop import train
from tests.conftest import make_colour_tags


def _multi_label(n: int, dim: int = 12, tags: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, tags, generator=g) < 0.3).float()
    targets[torch.arange(n), torch.arange(n) % tags] = 1.0  # every tag common enough for 5 folds
    mixing = torch.randn(tags, dim, generator=g)
    return targets @ mixing + 0.8 * torch.randn(n, dim, generator=g) + 3.0, targets


def test_running_moments_match_the_whole_data_ones():
    x, _ = _multi_label(1000, dim=40)
    running = RunningMoments()
    for start in range(0, len(x), 37):
        running.add(x[start:start + 37])
    mean, std = running.result()
    want_mean, want_std = _moments([x])
    assert torch.allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(std, want_std, rtol=1e-6)


def test_fit_on_the_drawn_rows_equals_the_fit_on_all(monkeypatch):
    monkeypatch.setattr(head_fit, "CV_MAX_IMAGES", 60)
    x, y = _multi_label(150)
    task = objective("multi")
    whole = fit_head([x], y, task, seed=3, final=False)
    rows = cv_rows(len(x), seed=3)
    assert len(rows) == 60 and bool((rows[1:] > rows[:-1]).all())
    running = RunningMoments()
    running.add(x)
    part = fit_head([x[rows]], y[rows], task, seed=3, final=False, population=Population(len(x), *running.result()))
    assert (part.l2, part.folds, part.views_used, part.message) == (whole.l2, whole.folds, whole.views_used, whole.message)
    assert part.cv_scores == pytest.approx(whole.cv_scores, abs=1e-6)
    assert torch.equal(part.oof_targets, whole.oof_targets)
    assert torch.allclose(part.oof_probs, whole.oof_probs, atol=1e-5)
    with pytest.raises(ValueError):  # the final fit reads every row: a sample cannot stand in
        fit_head([x[rows]], y[rows], task, seed=3, population=Population(len(x), *running.result()))


def _fake_pooled(model, loader, device, precision, channels_last, progress, description, total):
    yield from loader  # batches of (features, targets, keys) stand in for images


class _Batches(list):
    """A loader of ready batches, with the dataset length extract_sample reads."""

    def __init__(self, batches, count):
        super().__init__(batches)
        self.dataset = range(count)


def test_extract_sample_keeps_the_drawn_rows_in_key_order(monkeypatch):
    monkeypatch.setattr(features_module, "_pooled", _fake_pooled)
    x, y = _multi_label(50)
    keys = [f"train-{i:07d}" for i in range(50)]
    # two interleaved readers, as data-loader workers deliver them
    order = [i for pair in zip(range(0, 25), range(25, 50)) for i in pair]
    batches = [(x[order[s:s + 4]], y[order[s:s + 4]], [keys[i] for i in order[s:s + 4]]) for s in range(0, 50, 4)]
    rows = torch.tensor([1, 7, 20, 26, 49])
    sample = extract_sample(None, _Batches(batches, 50), rows, device=torch.device("cpu"), precision="fp32",
                            channels_last=False)
    assert sample is not None
    kept, moments = sample
    whole = extract_features(None, _Batches(batches, 50), device=torch.device("cpu"), precision="fp32", channels_last=False)
    assert torch.equal(kept.features, whole.features[rows]) and torch.equal(kept.targets, whole.targets[rows])
    assert kept.keys == [whole.keys[i] for i in rows]
    assert moments.rows == 50
    # keys that are not the importer's, or an index missing: the caller must hold everything
    odd = [(f, t, [k.replace("train-", "train_") for k in ks]) for f, t, ks in batches]
    assert extract_sample(None, _Batches(odd, 50), rows, device=torch.device("cpu"), precision="fp32",
                          channels_last=False) is None
    assert extract_sample(None, _Batches(batches[:-1], 50), rows, device=torch.device("cpu"), precision="fp32",
                          channels_last=False) is None


def test_fine_tuned_thresholds_from_the_sample_equal_those_from_every_row(tmp_path, monkeypatch):
    tags_csv = make_colour_tags(tmp_path / "src", 64)
    dataset = str(tmp_path / "ds")
    import_dataset(str(tags_csv), dataset, ImportOptions(val_fraction=0.25))
    monkeypatch.setattr(head_fit, "CV_MAX_IMAGES", 30)  # fewer than the 48 training images: the sample path
    monkeypatch.setattr(head_fit, "PROJECT_BELOW", 0.01)  # 48 rows of 848 features are not fitted on their span
    config = TrainConfig(backbone="test_efficientnet", pretrained=False, image_size=48, batch_size=8, workers=0, lr=2e-2,
                         frozen_epochs=0, unfrozen_epochs=1)
    calls = []
    real = features_module.extract_sample
    monkeypatch.setattr(features_module, "extract_sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(dataset, str(tmp_path / "sampled"), config)
    assert calls  # it took the sample path
    monkeypatch.setattr(features_module, "extract_sample", lambda *a, **k: None)  # every row held instead
    train(dataset, str(tmp_path / "whole"), config)
    sampled = json.loads((tmp_path / "sampled" / "thresholds.json").read_text())
    whole = json.loads((tmp_path / "whole" / "thresholds.json").read_text())
    assert sampled == pytest.approx(whole, abs=1e-6)
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("sampled", "whole")]
    assert metrics[0]["sources"] == metrics[1]["sources"]
