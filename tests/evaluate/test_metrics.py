"""Metric values on small cases whose right answer is known by hand."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from tagmill.errors import InputError
from tagmill.evaluate import EvaluationResult, multi_label_metrics, single_label_metrics


def one_hot_probs(predicted: list[int], num_classes: int) -> torch.Tensor:
    """Softmax-like rows whose arg-max is ``predicted``."""
    probs = torch.full((len(predicted), num_classes), 0.1 / (num_classes - 1))  # (N, C)
    probs[torch.arange(len(predicted)), torch.tensor(predicted)] = 0.9
    return probs


def fastai_fbeta(probs: torch.Tensor, targets: torch.Tensor, thresh: float, beta: float) -> float:
    """fastai v1's ``fbeta`` (sigmoid already applied), the reference our number must match."""
    eps = 1e-9
    pred = (probs > thresh).float()
    true = targets.float()
    tp = (pred * true).sum(dim=1)
    prec = tp / (pred.sum(dim=1) + eps)
    rec = tp / (true.sum(dim=1) + eps)
    return float(((prec * rec) / (prec * beta**2 + rec + eps) * (1 + beta**2)).mean())


# --- single-label ------------------------------------------------------------------


def test_perfect_single_label_predictions_score_one():
    targets = torch.tensor([0, 1, 2, 3, 1, 2])
    result = single_label_metrics(one_hot_probs(targets.tolist(), 4), targets, ["a", "b", "c", "d"], top_k=2)
    assert result.headline == {"accuracy": 1.0, "top2_accuracy": 1.0, "macro_f1": 1.0}
    assert result.confusion == [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]
    assert [row["support"] for row in result.per_class] == [1, 2, 2, 1]


def test_known_confusion_matrix_and_per_class_scores():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 2, 0]
    result = single_label_metrics(one_hot_probs(predicted, 3), targets, ["cat", "dog", "owl"])
    assert result.confusion == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result.headline["accuracy"] == pytest.approx(4 / 6)
    cat, dog, owl = result.per_class
    assert (cat["precision"], cat["recall"]) == pytest.approx((1 / 2, 1 / 2))
    assert (dog["precision"], dog["recall"], dog["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (owl["precision"], owl["recall"]) == pytest.approx((1.0, 1 / 2))
    assert result.headline["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert result.extra["macro_recall"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_top_k_counts_the_target_among_the_k_most_probable():
    # the target is always the second most probable of 6 classes
    probs = torch.tensor([[0.5, 0.3, 0.05, 0.05, 0.05, 0.05]] * 4)  # (4, 6)
    targets = torch.tensor([1, 1, 1, 1])
    result = single_label_metrics(probs, targets, list("abcdef"), top_k=2)
    assert result.headline["accuracy"] == 0.0
    assert result.headline["top2_accuracy"] == 1.0
    assert result.params == {"top_k": 2}


def test_top_k_is_left_out_when_k_covers_every_class():
    targets = torch.tensor([0, 1, 2])
    result = single_label_metrics(one_hot_probs([1, 2, 0], 3), targets, ["a", "b", "c"], top_k=5)
    assert set(result.headline) == {"accuracy", "macro_f1"}
    assert result.headline["accuracy"] == 0.0


@pytest.mark.parametrize(
    ("probs", "targets", "classes", "match"),
    [
        (torch.rand(4, 3), torch.tensor([0, 1, 2]), ["a", "b", "c"], "shape"),
        (torch.randn(4, 3) * 5, torch.tensor([0, 1, 2, 0]), ["a", "b", "c"], r"\[0, 1\]"),
        (torch.rand(4, 3), torch.tensor([0, 1, 3, 0]), ["a", "b", "c"], "class indices"),
        (torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), ["a", "b"], "class names"),
        (torch.rand(4, 3), torch.tensor([0.0, 1.0, 2.0, 0.0]), ["a", "b", "c"], "integer"),
        (torch.rand(4), torch.tensor([0, 1, 2, 0]), ["a", "b", "c"], r"\(N, C\)"),
    ],
)
def test_bad_single_label_input_is_an_input_error(probs, targets, classes, match):
    with pytest.raises(InputError, match=match):
        single_label_metrics(probs, targets, classes)


def test_result_is_json_ready_and_round_trips():
    targets = torch.tensor([0, 1, 1])
    result = single_label_metrics(one_hot_probs([0, 1, 0], 2), targets, ["no", "yes"])
    data = json.loads(json.dumps(result.as_dict(), allow_nan=False))
    assert data["task"] == "single"
    assert data["classes"] == ["no", "yes"]
    assert EvaluationResult.from_dict(data) == result
    assert result.summary_line().startswith("accuracy 0.667")


# --- multi-label -------------------------------------------------------------------


def test_accuracy_thresh_and_fbeta_match_fastai_by_hand():
    probs = torch.tensor([[0.1, 0.3, 0.9], [0.25, 0.15, 0.6]])
    targets = torch.tensor([[0, 1, 1], [1, 0, 0]])
    result = multi_label_metrics(probs, targets, ["bed", "legs", "text"], threshold=0.2, beta=2.0)
    # prob > 0.2 predicts [[0, 1, 1], [1, 0, 1]]: 5 of the 6 decisions are right
    assert result.headline["accuracy_thresh"] == pytest.approx(5 / 6)
    # row 0 is perfect (F2 = 1); row 1 has precision 1/2, recall 1: F2 = 5·0.5 / (4·0.5 + 1) = 5/6
    assert result.headline["fbeta"] == pytest.approx((1 + 5 / 6) / 2)


def test_fbeta_is_fastais_sample_averaged_fbeta():
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 9, generator=generator)
    targets = (torch.rand(64, 9, generator=generator) < 0.3).long()
    targets[0] = 0  # a sample with no tag at all: 0 in fastai too
    result = multi_label_metrics(probs, targets, [f"t{i}" for i in range(9)], threshold=0.2, beta=2.0)
    assert result.headline["fbeta"] == pytest.approx(fastai_fbeta(probs, targets, 0.2, 2.0), abs=1e-6)
    expected_accuracy = float(((probs > 0.2).long() == targets).float().mean())
    assert result.headline["accuracy_thresh"] == pytest.approx(expected_accuracy)


def test_perfect_multi_label_predictions_score_one():
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    probs = targets * 0.8 + 0.05  # (4, 3)
    result = multi_label_metrics(probs, targets, ["a", "b", "c"])
    assert result.headline == pytest.approx(
        {"accuracy_thresh": 1.0, "fbeta": 1.0, "micro_f1": 1.0, "macro_f1": 1.0, "mAP": 1.0, "roc_auc": 1.0}
    )
    assert result.confusion is None
    assert [row["support"] for row in result.per_class] == [2, 2, 2]


def test_tags_with_one_target_value_are_left_out_of_roc_auc_without_warnings():
    probs = torch.tensor([[0.9, 0.1, 0.3, 0.7], [0.2, 0.8, 0.6, 0.9], [0.7, 0.4, 0.1, 0.8]])
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 1]])  # "never": no positive, "always": all
    classes = ["a", "b", "never", "always"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warns when it scores an undefined class
        result = multi_label_metrics(probs, targets, classes)
    assert result.excluded == {"mAP": ["never"], "roc_auc": ["never", "always"]}
    assert result.headline["roc_auc"] == 1.0  # over a and b only, both separated perfectly
    assert result.headline["mAP"] == 1.0  # "always" has AP 1: every prediction ranks a positive
    rows = {row["class"]: row for row in result.per_class}
    assert rows["never"]["roc_auc"] is None and rows["never"]["ap"] is None
    assert rows["always"]["roc_auc"] is None and rows["always"]["ap"] == 1.0


def test_no_tag_with_a_defined_roc_auc_gives_nan_then_null():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    targets = torch.tensor([[1, 0], [1, 0]])
    result = multi_label_metrics(probs, targets, ["all", "none"])
    assert math.isnan(result.headline["roc_auc"])
    assert json.loads(json.dumps(result.as_dict(), allow_nan=False))["headline"]["roc_auc"] is None


def test_one_threshold_per_tag():
    probs = torch.tensor([[0.3, 0.3], [0.1, 0.6]])
    targets = torch.tensor([[1, 0], [0, 1]])
    # 0.2 for the first tag, 0.5 for the second: every decision right
    result = multi_label_metrics(probs, targets, ["a", "b"], threshold=torch.tensor([0.2, 0.5]))
    assert result.headline["accuracy_thresh"] == 1.0
    assert result.params["threshold"] == [0.2, 0.5]
    assert [row["threshold"] for row in result.per_class] == [0.2, 0.5]


def test_a_single_tag_works():
    probs = torch.tensor([[0.9], [0.1], [0.7]])
    targets = torch.tensor([[1], [0], [0]])
    result = multi_label_metrics(probs, targets, ["only"], threshold=0.5)
    assert result.headline["roc_auc"] == 1.0
    assert result.per_class[0]["ap"] == 1.0


@pytest.mark.parametrize(
    ("targets", "threshold", "match"),
    [
        (torch.tensor([[1, 0, 2]]), 0.2, "0 or 1"),
        (torch.tensor([[1, 0]]), 0.2, "shape"),
        (torch.tensor([[1, 0, 1]]), 1.5, r"\[0, 1\]"),
        (torch.tensor([[1, 0, 1]]), torch.tensor([0.2, 0.3]), "shape"),
    ],
)
def test_bad_multi_label_input_is_an_input_error(targets, threshold, match):
    with pytest.raises(InputError, match=match):
        multi_label_metrics(torch.tensor([[0.5, 0.1, 0.9]]), targets, ["a", "b", "c"], threshold=threshold)


def test_map_and_roc_auc_are_torchmetrics_macro_averages_over_the_defined_tags():
    from torchmetrics.functional.classification import multilabel_auroc, multilabel_average_precision

    generator = torch.Generator().manual_seed(4)
    targets = (torch.rand(80, 6, generator=generator) < 0.4).long()  # (N, C)
    targets[:, 2] = 0  # undefined for both
    targets[:, 4] = 1  # undefined for ROC-AUC only
    probs = (0.3 * targets + 0.7 * torch.rand(80, 6, generator=generator)).clamp(0, 1)  # (N, C)
    result = multi_label_metrics(probs, targets, list("abcdef"))
    ap_tags, auc_tags = [0, 1, 3, 4, 5], [0, 1, 3, 5]
    expected_map = multilabel_average_precision(probs[:, ap_tags], targets[:, ap_tags], num_labels=5)
    expected_auc = multilabel_auroc(probs[:, auc_tags], targets[:, auc_tags], num_labels=4)
    assert result.headline["mAP"] == pytest.approx(float(expected_map), abs=1e-6)
    assert result.headline["roc_auc"] == pytest.approx(float(expected_auc), abs=1e-6)


def test_single_label_macro_leaves_out_a_class_neither_present_nor_predicted():
    targets = torch.tensor([0, 0, 1, 1])
    result = single_label_metrics(one_hot_probs([0, 1, 1, 1], 3), targets, ["a", "b", "unseen"])
    # a: F1 2/3 (P 1, R 1/2); b: F1 0.8 (P 2/3, R 1); "unseen" has nothing to score
    assert result.headline["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert result.per_class[2] == {"class": "unseen", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
