"""Metrics over a model's predictions, computed with torchmetrics.

Everything here is a pure function of probabilities and targets; the training loop
calls it on the validation split and ``tagmill evaluate`` on any split. The numbers
themselves come from torchmetrics' functional API so they agree with what other
PyTorch code reports; this module only validates inputs, decides which classes a
metric is defined for, and shapes the result into plain values for ``metrics.json``.

Definitions (N samples, C classes):

Single-label (``probs`` are softmax outputs, ``targets`` class indices):

* ``accuracy`` – fraction of samples whose arg-max class is the target.
* ``top{k}_accuracy`` – fraction whose target is among the k most probable classes.
  Reported only when ``1 < k < C``: with ``k >= C`` every sample is trivially right,
  and ``k == 1`` is ``accuracy``. ``params["top_k"]`` records the k used.
* ``macro_precision`` / ``macro_recall`` / ``macro_f1`` – unweighted mean over the
  classes that occur in the targets or the predictions (torchmetrics leaves out a
  class with no true positive, false positive or false negative: nothing to score).
* per class: precision, recall, F1 and support (number of targets of that class);
  a class never predicted has precision 0, one never present has recall 0.
* ``confusion`` – C×C counts, row = true class, column = predicted class.

Multi-label (``probs`` are per-tag sigmoid outputs, ``targets`` 0/1 per tag). A tag is
predicted when ``prob > threshold`` (strictly, as fastai and torchmetrics do); the
threshold is one float or one per tag.

* ``accuracy_thresh`` – fastai's ``accuracy_thresh``: the fraction of all N×C
  (sample, tag) decisions that are right. torchmetrics' ``multilabel_accuracy`` with
  ``average="micro"`` sums TP+TN over every entry and divides by N×C: the same number.
* ``fbeta`` – fastai's ``fbeta`` (β=2 by default): F-beta of each *sample* over its
  tags, then the mean over samples. torchmetrics' ``multilabel_fbeta_score`` has no
  per-sample average across labels (its ``samplewise`` reduces extra dimensions after
  the label axis), but ``binary_fbeta_score(..., multidim_average="samplewise")`` on
  the (N, C) decision matrix treats each row as one sample's binary problem and
  returns the N per-sample scores; their mean is fastai's number. A sample with no
  true and no predicted tag scores 0, as in fastai (whose eps makes 0/0 → 0).
* ``micro_f1`` – F1 over all (sample, tag) decisions pooled; ``macro_f1`` – mean of
  the C per-tag F1 scores (every tag counts; a tag with no positive and no
  prediction scores 0, torchmetrics' ``zero_division`` default). Micro/macro
  precision and recall are in ``extra``.
* ``mAP`` – mean over tags of average precision (threshold-free), over the tags with
  at least one positive: AP is undefined without positives (torchmetrics would
  return a meaningless value).
* ``roc_auc`` – macro ROC-AUC over the tags whose targets hold both 0s and 1s. A tag
  with only one target value has no ROC curve; torchmetrics warns and scores it 0,
  which would drag the mean down for no reason. Such tags are left out of the mean,
  listed in ``excluded["roc_auc"]`` (``excluded["mAP"]`` for AP), and get ``None`` in
  their per-class row. When no tag qualifies the headline value is NaN (``None`` in
  ``as_dict()``).
* per class: precision, recall, F1, support (positives), AP, ROC-AUC, threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
    binary_fbeta_score,
    binary_precision,
    binary_recall,
    binary_stat_scores,
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multiclass_stat_scores,
    multilabel_accuracy,
    multilabel_auroc,
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_fbeta_score,
    multilabel_precision,
    multilabel_recall,
    multilabel_stat_scores,
)

from tagmill.errors import InputError
from tagmill.objective import TaskName

#: The threshold users' fastai job on movie stills (183 tags) used for its metrics.
DEFAULT_MULTI_THRESHOLD = 0.2

# torchmetrics refuses num_labels=1, but one tag is exactly the binary problem of its
# column: these are the binary twins used then (see multilabel_score).
_BINARY_TWIN: dict[Any, Any] = {
    multilabel_accuracy: binary_accuracy,
    multilabel_auroc: binary_auroc,
    multilabel_average_precision: binary_average_precision,
    multilabel_f1_score: binary_f1_score,
    multilabel_fbeta_score: binary_fbeta_score,
    multilabel_precision: binary_precision,
    multilabel_recall: binary_recall,
    multilabel_stat_scores: binary_stat_scores,
}


@dataclass
class EvaluationResult:
    """Metrics of one model on one split; ``as_dict()`` is what metrics.json holds."""

    task: TaskName
    #: the few numbers of a one-line summary (see the module docstring for each key)
    headline: dict[str, float]
    #: one row per class, in class order: {"class", "precision", "recall", "f1", "support", ...}
    per_class: list[dict[str, Any]]
    #: C×C counts, row = true class, column = predicted (single-label only)
    confusion: list[list[int]] | None = None
    classes: list[str] = field(default_factory=list)
    num_samples: int = 0
    #: further aggregate numbers that do not belong in a one-line summary
    extra: dict[str, float] = field(default_factory=dict)
    #: how the numbers were computed: top_k, threshold(s), beta
    params: dict[str, Any] = field(default_factory=dict)
    #: metric -> classes left out of its macro average because it is undefined for them
    excluded: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: no tensors, and NaN written as None (JSON has no NaN)."""
        return _plain(
            {
                "task": self.task,
                "num_samples": self.num_samples,
                "classes": self.classes,
                "headline": self.headline,
                "extra": self.extra,
                "params": self.params,
                "excluded": self.excluded,
                "per_class": self.per_class,
                "confusion": self.confusion,
            }
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """The inverse of :meth:`as_dict` (None headline values come back as NaN)."""
        try:
            return cls(
                task=data["task"],
                headline={k: math.nan if v is None else float(v) for k, v in data["headline"].items()},
                per_class=list(data["per_class"]),
                confusion=data.get("confusion"),
                classes=list(data.get("classes", [])),
                num_samples=int(data.get("num_samples", 0)),
                extra={k: math.nan if v is None else float(v) for k, v in data.get("extra", {}).items()},
                params=dict(data.get("params", {})),
                excluded={k: list(v) for k, v in data.get("excluded", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"not a tagmill metrics record: {exc}") from exc

    def summary_line(self) -> str:
        """'accuracy 0.912 · top5_accuracy 0.987 · macro_f1 0.874'."""
        return " · ".join(f"{name} {value:.3f}" for name, value in self.headline.items())


def single_label_metrics(probs: Tensor, targets: Tensor, classes: list[str], top_k: int = 5) -> EvaluationResult:
    """Metrics of a softmax classifier: ``probs`` (N, C), ``targets`` (N,) class indices."""
    probs = _check_probs(probs)
    num_samples, num_classes = probs.shape
    _check_classes(classes, num_classes)
    if num_classes < 2:
        raise InputError("single-label metrics need at least 2 classes")
    targets = _check_class_targets(targets, num_samples, num_classes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")

    # validate_args=False: the inputs were checked above; see multilabel_score
    def score(fn: Any, **kwargs: Any) -> Tensor:
        return fn(probs, targets, num_classes=num_classes, validate_args=False, **kwargs)

    headline = {"accuracy": _item(score(multiclass_accuracy, average="micro"))}
    params: dict[str, Any] = {}
    if 1 < top_k < num_classes:
        headline[f"top{top_k}_accuracy"] = _item(score(multiclass_accuracy, average="micro", top_k=top_k))
        params["top_k"] = top_k
    headline["macro_f1"] = _item(score(multiclass_f1_score, average="macro"))
    extra = {
        "macro_precision": _item(score(multiclass_precision, average="macro")),
        "macro_recall": _item(score(multiclass_recall, average="macro")),
    }

    columns = {
        "precision": score(multiclass_precision, average=None),  # (C,)
        "recall": score(multiclass_recall, average=None),  # (C,)
        "f1": score(multiclass_f1_score, average=None),  # (C,)
        "support": score(multiclass_stat_scores, average=None)[:, 4],  # (C,) of tp, fp, tn, fn, support
    }
    per_class = _rows(classes, columns)
    confusion = score(multiclass_confusion_matrix)  # (C, C) rows = true
    return EvaluationResult(
        task="single",
        headline=headline,
        per_class=per_class,
        confusion=confusion.tolist(),
        classes=list(classes),
        num_samples=num_samples,
        extra=extra,
        params=params,
    )


def multi_label_metrics(
    probs: Tensor,
    targets: Tensor,
    classes: list[str],
    threshold: float | Tensor = DEFAULT_MULTI_THRESHOLD,
    beta: float = 2.0,
) -> EvaluationResult:
    """Metrics of a sigmoid tagger: ``probs`` and ``targets`` (N, C), targets in {0, 1}."""
    probs = _check_probs(probs)
    num_samples, num_classes = probs.shape
    _check_classes(classes, num_classes)
    targets = _check_tag_targets(targets, probs.shape)
    thresholds = _check_threshold(threshold, num_classes).to(probs.device)  # (C,)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
        raise InputError(f"beta must be a positive number, got {beta!r}")
    beta = float(beta)

    # Decide each (sample, tag) ourselves so a per-tag threshold works; torchmetrics
    # takes integer predictions as decisions and applies no threshold of its own.
    decisions = (probs > thresholds).long()  # (N, C)

    def score(fn: Any, **kwargs: Any) -> Tensor:
        return multilabel_score(fn, decisions, targets, **kwargs)

    roc_auc, roc_defined = _auroc_per_tag(probs, targets)  # (C,), (C,) bool
    ap, ap_defined = _average_precision_per_tag(probs, targets)  # (C,), (C,) bool
    # the threshold-free and untagged-safe metrics first; fastai's two after them
    headline = {
        "mAP": _mean_defined(ap),
        "micro_f1": _item(score(multilabel_f1_score, average="micro")),
        "macro_f1": _item(score(multilabel_f1_score, average="macro")),
        "roc_auc": _mean_defined(roc_auc),
        "accuracy_thresh": _item(score(multilabel_accuracy, average="micro")),
        # per-sample F-beta over tags, mean over samples: see the module docstring
        "fbeta": _item(
            binary_fbeta_score(decisions, targets, beta=beta, multidim_average="samplewise", validate_args=False).mean()
        ),
    }
    extra = {
        "micro_precision": _item(score(multilabel_precision, average="micro")),
        "micro_recall": _item(score(multilabel_recall, average="micro")),
        "macro_precision": _item(score(multilabel_precision, average="macro")),
        "macro_recall": _item(score(multilabel_recall, average="macro")),
    }

    columns = {
        "precision": score(multilabel_precision, average=None),  # (C,)
        "recall": score(multilabel_recall, average=None),  # (C,)
        "f1": score(multilabel_f1_score, average=None),  # (C,)
        "support": score(multilabel_stat_scores, average=None)[:, 4],  # (C,) of tp, fp, tn, fn, support
        "ap": ap,  # (C,) NaN where undefined
        "roc_auc": roc_auc,  # (C,) NaN where undefined
        "threshold": thresholds,  # (C,)
    }
    per_class = _rows(classes, columns)
    used = [row["threshold"] for row in per_class]
    return EvaluationResult(
        task="multi",
        headline=headline,
        per_class=per_class,
        confusion=None,
        classes=list(classes),
        num_samples=num_samples,
        extra=extra,
        params={"threshold": used[0] if len(set(used)) == 1 else used, "beta": beta},
        excluded={
            "mAP": [name for name, ok in zip(classes, ap_defined.tolist()) if not ok],
            "roc_auc": [name for name, ok in zip(classes, roc_defined.tolist()) if not ok],
        },
    )


def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Single-label accuracy alone (the best-model selector), without the full metric set."""
    probs = _check_probs(probs)
    targets = _check_class_targets(targets, probs.shape[0], probs.shape[1])
    return _item(multiclass_accuracy(probs, targets, num_classes=probs.shape[1], average="micro", validate_args=False))


def mean_average_precision(probs: Tensor, targets: Tensor) -> float:
    """Multi-label mAP alone (the best-model selector): mean AP over tags with a positive."""
    probs = _check_probs(probs)
    targets = _check_tag_targets(targets, probs.shape)
    return _mean_defined(_average_precision_per_tag(probs, targets)[0])


def _rows(classes: list[str], columns: dict[str, Tensor]) -> list[dict[str, Any]]:
    """One plain dict per class from per-class tensors (C,): ints stay ints, NaN becomes None."""
    values = {key: column.tolist() for key, column in columns.items()}  # one device sync per column
    rows = []
    for i, name in enumerate(classes):
        row: dict[str, Any] = {"class": name}
        for key, column in values.items():
            value = column[i]
            if isinstance(value, float):
                # rounded: thresholds travel as float32, whose 0.2 would read 0.20000000298
                value = None if math.isnan(value) else (round(value, 6) if key == "threshold" else value)
            row[key] = value
        rows.append(row)
    return rows


# --- multi-label helpers -------------------------------------------------------------


def _auroc_per_tag(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tag ROC-AUC (C,) and whether it is defined: the tag has both 0 and 1 targets."""
    positives = targets.sum(0)  # (C,)
    defined = (positives > 0) & (positives < targets.shape[0])  # (C,)
    return _per_tag_over(probs, targets, defined, multilabel_auroc), defined


def _average_precision_per_tag(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tag AP (C,) and whether it is defined: the tag has at least one positive."""
    defined = targets.sum(0) > 0  # (C,)
    return _per_tag_over(probs, targets, defined, multilabel_average_precision), defined


def _per_tag_over(probs: Tensor, targets: Tensor, defined: Tensor, fn: Any) -> Tensor:
    """``fn(average=None)`` on the defined tags only (so torchmetrics never warns); NaN elsewhere."""
    values = torch.full((probs.shape[1],), math.nan, device=probs.device)  # (C,)
    columns = defined.nonzero().flatten()  # (K,)
    if len(columns) > 0:
        values[columns] = multilabel_score(fn, probs[:, columns], targets[:, columns], average=None)
    return values


def _mean_defined(per_tag: Tensor) -> float:
    """The macro average over the tags where a metric is defined (not NaN); NaN when none is.

    Exactly torchmetrics' ``average="macro"`` on those tags (an unweighted mean of its
    per-tag values), taken from the per-tag scores so the curves are computed once.
    """
    defined = per_tag[~per_tag.isnan()]  # (K,)
    return _item(defined.mean()) if len(defined) else math.nan


def multilabel_score(fn: Any, preds: Tensor, targets: Tensor, *, average: str | None, **kwargs: Any) -> Tensor:
    """``fn(preds, targets, num_labels=C, average=...)`` for a torchmetrics multilabel function.

    With C == 1 its binary twin runs on the one column instead (torchmetrics refuses a
    single label); a per-label result (``average=None``) keeps its label axis, (1, ...).
    Inputs must already have passed ``_check_*``: torchmetrics' own argument checks
    (a ``torch.unique`` over all N×C values) would cost 3-4× the metric itself.
    """
    num_labels = preds.shape[1]
    if num_labels > 1:
        return fn(preds, targets, num_labels=num_labels, average=average, validate_args=False, **kwargs)
    value = _BINARY_TWIN[fn](preds[:, 0], targets[:, 0], validate_args=False, **kwargs)
    return value.unsqueeze(0) if average is None else value


# --- input checks ---------------------------------------------------------------------


def _check_probs(probs: Tensor) -> Tensor:
    if not isinstance(probs, Tensor):
        raise InputError(f"probs must be a torch.Tensor, got {type(probs).__name__}")
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise InputError(f"probs must have shape (N, C) with N, C >= 1, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise InputError(f"probs must be floating point, got {probs.dtype}")
    probs = probs.detach().float()  # half precision is not accepted by every torchmetrics kernel
    if not bool(torch.isfinite(probs).all()):
        raise InputError("probs contain NaN or infinite values")
    if bool((probs < 0).any()) or bool((probs > 1).any()):
        raise InputError(
            "probs must lie in [0, 1]", hint="pass probabilities (softmax / sigmoid outputs), not logits"
        )
    return probs


def _check_classes(classes: list[str], num_classes: int) -> None:
    if len(classes) != num_classes:
        raise InputError(f"{len(classes)} class names for {num_classes} columns of probabilities")
    if len(set(classes)) != len(classes):
        raise InputError("class names must be unique")


def _check_class_targets(targets: Tensor, num_samples: int, num_classes: int) -> Tensor:
    if not isinstance(targets, Tensor):
        raise InputError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != (num_samples,):
        raise InputError(f"targets must have shape ({num_samples},), got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise InputError(f"single-label targets must be integer class indices, got {targets.dtype}")
    if bool((targets < 0).any()) or bool((targets >= num_classes).any()):
        raise InputError(f"targets must be class indices in [0, {num_classes})")
    return targets.detach().long()


def _check_tag_targets(targets: Tensor, shape: torch.Size) -> Tensor:
    if not isinstance(targets, Tensor):
        raise InputError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != shape:
        raise InputError(f"targets must have the shape of probs {tuple(shape)}, got {tuple(targets.shape)}")
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise InputError("multi-label targets must be 0 or 1")
    return targets.detach().long()


def _check_threshold(threshold: float | Tensor, num_classes: int) -> Tensor:
    """One threshold per tag (C,), from a float or a (C,) tensor, each in [0, 1]."""
    if isinstance(threshold, Tensor):
        if threshold.shape not in {(num_classes,), ()}:
            raise InputError(f"threshold must be a float or have shape ({num_classes},), got {tuple(threshold.shape)}")
        values = threshold.detach().float().expand(num_classes).clone()
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        values = torch.full((num_classes,), float(threshold))
    else:
        raise InputError(f"threshold must be a float or a tensor, got {type(threshold).__name__}")
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise InputError("thresholds must lie in [0, 1]")
    return values


def _item(value: Tensor) -> float:
    return float(value.item())


def _plain(value: Any) -> Any:
    """Tensors to lists, NaN/inf to None, recursively: what json.dumps accepts strictly."""
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
