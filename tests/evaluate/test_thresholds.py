"""Per-tag thresholds tuned on validation data."""

from __future__ import annotations

import pytest
import torch

from tagmill.errors import InputError
from tagmill.evaluate import default_grid, multi_label_metrics, tune_thresholds


def per_tag_f1(probs: torch.Tensor, targets: torch.Tensor, threshold: float | torch.Tensor) -> list[float]:
    classes = [f"t{i}" for i in range(probs.shape[1])]
    return [row["f1"] for row in multi_label_metrics(probs, targets, classes, threshold=threshold).per_class]


def test_a_separable_tag_gets_a_threshold_between_its_negatives_and_positives():
    # tag 0: positives at 0.3, negatives at 0.1 -> any threshold in [0.1, 0.3) is perfect;
    # the default 0.5 would predict nothing
    probs = torch.tensor([[0.3, 0.9], [0.3, 0.8], [0.1, 0.2], [0.1, 0.7]])
    targets = torch.tensor([[1, 1], [1, 1], [0, 0], [0, 1]])
    thresholds = tune_thresholds(probs, targets, default=0.5)
    assert 0.1 <= float(thresholds[0]) < 0.3
    assert per_tag_f1(probs, targets, thresholds) == [1.0, 1.0]


def test_tuned_thresholds_never_lower_validation_f1_for_any_tag():
    generator = torch.Generator().manual_seed(1)
    targets = (torch.rand(300, 12, generator=generator) < torch.linspace(0.02, 0.5, 12)).long()  # (N, C)
    # informative but noisy scores, scaled differently per tag as real taggers are
    logits = 2.0 * targets + torch.randn(300, 12, generator=generator) - torch.linspace(0, 3, 12)
    probs = torch.sigmoid(logits)  # (N, C)
    thresholds = tune_thresholds(probs, targets, beta=1.0, default=0.5)
    tuned = per_tag_f1(probs, targets, thresholds)
    default = per_tag_f1(probs, targets, 0.5)
    assert all(t >= d for t, d in zip(tuned, default)), list(zip(tuned, default))
    assert sum(tuned) > sum(default)  # and it does help on this data


def test_a_tag_without_positives_keeps_the_default():
    probs = torch.tensor([[0.9, 0.6], [0.2, 0.7], [0.8, 0.1]])
    targets = torch.tensor([[1, 0], [0, 0], [1, 0]])
    thresholds = tune_thresholds(probs, targets, default=0.35)
    assert float(thresholds[1]) == pytest.approx(0.35)


def test_ties_keep_the_threshold_nearest_the_default():
    probs = torch.tensor([[0.9, 0.9], [0.05, 0.05]])
    targets = torch.tensor([[1, 1], [0, 0]])
    # every grid value from 0.05 to 0.85 separates the two samples; the default wins the tie
    thresholds = tune_thresholds(probs, targets, default=0.5)
    assert thresholds.tolist() == pytest.approx([0.5, 0.5])
    # an off-grid default is a candidate too
    thresholds = tune_thresholds(probs, targets, grid=torch.tensor([0.3, 0.6]), default=0.42)
    assert thresholds.tolist() == pytest.approx([0.42, 0.42])


def test_custom_grid_and_beta():
    probs = torch.tensor([[0.35, 0.5], [0.25, 0.5], [0.15, 0.5], [0.05, 0.5]])
    targets = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]])
    grid = torch.tensor([0.1, 0.2, 0.3])
    # tag 0 at 0.2: TP 2, FP 0 (F=1); beta barely matters for a perfect split
    assert float(tune_thresholds(probs, targets, grid=grid, beta=2.0, default=0.9)[0]) == pytest.approx(0.2)
    # F2 favours recall: predicting every sample (recall 1, precision 1/2) beats predicting none
    assert float(tune_thresholds(probs, targets, grid=grid, beta=2.0, default=0.9)[1]) < 0.5


def test_default_grid():
    grid = default_grid()
    assert len(grid) == 19
    assert float(grid[0]) == pytest.approx(0.05) and float(grid[-1]) == pytest.approx(0.95)


def test_a_single_tag_works():
    thresholds = tune_thresholds(torch.tensor([[0.3], [0.1]]), torch.tensor([[1], [0]]), default=0.5)
    assert thresholds.shape == (1,)
    assert 0.1 <= float(thresholds[0]) < 0.3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": torch.tensor([0.2, 1.5])}, "grid"),
        ({"grid": torch.tensor([])}, "grid"),
        ({"beta": 0.0}, "beta"),
        ({"default": 2.0}, "default"),
    ],
)
def test_bad_arguments_are_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        tune_thresholds(torch.tensor([[0.3, 0.2]]), torch.tensor([[1, 0]]), **kwargs)


def test_tags_with_few_positives_share_the_best_micro_threshold():
    generator = torch.Generator().manual_seed(3)
    targets = (torch.rand(400, 3, generator=generator) < torch.tensor([0.5, 0.03, 0.03])).long()  # (N, 3)
    probs = (0.35 * targets + 0.6 * torch.rand(400, 3, generator=generator)).clamp(0, 1)
    own = tune_thresholds(probs, targets)
    mixed = tune_thresholds(probs, targets, min_positives=50)
    assert int(targets[:, 0].sum()) >= 50 and int(targets[:, 1:].sum(0).max()) < 50
    assert float(mixed[0]) == float(own[0])  # enough positives: its own threshold
    assert float(mixed[1]) == float(mixed[2])  # the rare tags share one ...
    grid = torch.unique(torch.cat([default_grid(), torch.tensor([0.5])]))
    micro = [multi_label_metrics(probs, targets, ["a", "b", "c"], threshold=float(t)).headline["micro_f1"] for t in grid]
    shared = multi_label_metrics(probs, targets, ["a", "b", "c"], threshold=float(mixed[1])).headline["micro_f1"]
    assert shared == pytest.approx(max(micro))  # ... the one best for all tags together
