"""Single-label or multi-label: the one place that says what that means for a model.

A dataset's ``task`` ("single" | "multi", in ``dataset.json`` and ``model.json``) decides
how logits become probabilities (softmax over classes, or a sigmoid per tag), which
loss trains them, which metrics score them and which metric picks the best model.
Training, evaluation, bundles and the server all ask an :class:`Objective` instead of
testing the task name themselves.

The selection metric for tags is mAP: it is threshold-free and right on untagged
images (an image with no tag and no prediction costs nothing), unlike fastai's
sample-averaged F-beta, which scores such an image 0 and so cannot exceed the
fraction of tagged images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tagmill.errors import InputError
from tagmill.formats.base import TaskName

if TYPE_CHECKING:
    from tagmill.evaluate.metrics import EvaluationResult

TASKS: tuple[str, ...] = ("single", "multi")


@dataclass(frozen=True)
class Objective:
    task: TaskName

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")

    @property
    def single(self) -> bool:
        return self.task == "single"

    @property
    def selection_metric(self) -> str:
        """The validation metric that picks the best model: accuracy, or mAP for tags."""
        return "accuracy" if self.single else "mAP"

    def probabilities(self, logits: Tensor) -> Tensor:
        """(N, C) logits -> (N, C) probabilities: softmax over classes, or one sigmoid per tag."""
        return logits.softmax(-1) if self.single else logits.sigmoid()

    def loss_module(self, *, label_smoothing: float = 0.0, pos_weight: Tensor | None = None) -> torch.nn.Module:
        """Mean loss over a batch; targets are (B,) class indices or (B, C) multi-hot floats."""
        if self.single:
            return torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean loss; for tags, summed over tags (each tag its own logistic regression)."""
        if self.single:
            return torch.nn.functional.cross_entropy(logits, targets)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum") / len(targets)

    def per_sample_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(N,) loss of each sample (mean over tags), for finding the worst predictions."""
        if self.single:
            return torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(-1)

    def num_outputs(self, targets: Tensor) -> int:
        """Classes (or tags) that ``targets`` can name: max index + 1, or the multi-hot width."""
        return int(targets.max()) + 1 if self.single else int(targets.shape[1])

    def metrics(
        self, probs: Tensor, targets: Tensor, classes: list[str], *, threshold: float | Tensor = 0.2, top_k: int = 5
    ) -> EvaluationResult:
        """Every metric of ``probs`` against ``targets`` (see ``tagmill.evaluate.metrics``)."""
        from tagmill.evaluate.metrics import multi_label_metrics, single_label_metrics

        if self.single:
            return single_label_metrics(probs, targets, classes, top_k=top_k)
        return multi_label_metrics(probs, targets, classes, threshold=threshold)

    def selection_score(self, probs: Tensor, targets: Tensor) -> float:
        """The selection metric alone: cheap enough for every epoch and every fold."""
        from tagmill.evaluate.metrics import accuracy, mean_average_precision

        return accuracy(probs, targets) if self.single else mean_average_precision(probs, targets)


def objective(task: str) -> Objective:
    return Objective(task)  # type: ignore[arg-type]
