"""Which labels look wrong, judged by models that never saw them.

Input: out-of-fold probabilities (``train.head_fit`` fits k heads on the cached
features; each image is scored by the head that did not train on it) and the given
labels. An image is flagged when the held-out models prefer another class to the given
one, and every image gets a score in [0, 1] (the margin of the best other class over the
given one: higher, more likely mislabelled) so a user can read the list from the top.

Multi-label data is judged per (image, tag), with a threshold per tag halfway between
the models' mean probability on the images that have the tag and on those that do not
(tags differ in how sure the models get): a tag that is absent but predicted above it
looks *missing*; a tag that is present but predicted below it looks *wrong*.

Confident learning's stricter test (flag only when the other class clears the models'
mean confidence on that class's own images) missed clear flips with heads fitted to
convergence: their mean confidence is near 0.99, and a planted flip scored 0.65 for
its true class was not flagged (tests/doctor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tagmill.errors import InputError


@dataclass(frozen=True)
class LabelIssue:
    index: int  #: row of the probabilities
    kind: str  #: "wrong_label" (single-label), "missing_tag" or "wrong_tag" (multi-label)
    given: int | None  #: the class given (single-label), or the tag concerned (multi-label)
    suggested: int | None  #: the class the models prefer (single-label); None for tags
    score: float  #: in [0, 1]; higher: more likely a labelling mistake
    flagged: bool  #: whether the held-out models prefer another label (not just ranked)


def _check(probs: Tensor, expected_rows: int) -> None:
    if probs.dim() != 2 or probs.shape[0] != expected_rows or probs.shape[0] == 0:
        raise InputError(f"need (N, C) probabilities for N = {expected_rows} images, not {tuple(probs.shape)}")
    if not torch.isfinite(probs).all():
        raise InputError("probabilities must be finite")


def single_label_issues(probs: Tensor, labels: Tensor) -> list[LabelIssue]:
    """One entry per image, most suspicious first. ``probs`` (N, C) sum to 1 per row;
    ``labels`` (N,) are class indices."""
    _check(probs, labels.shape[0])
    probs = probs.to(torch.float64)
    n = probs.shape[0]
    rows = torch.arange(n)
    given = probs[rows, labels]
    others = probs.clone()
    others[rows, labels] = -1.0
    best_other, suggested = others.max(dim=1)
    flagged = best_other > given
    score = (best_other - given + 1.0) / 2.0  # margin of the best other class, mapped to [0, 1]
    issues = [
        LabelIssue(i, "wrong_label", int(labels[i]), int(suggested[i]), float(score[i]), bool(flagged[i]))
        for i in range(n)
    ]
    issues.sort(key=lambda issue: (-issue.flagged, -issue.score))
    return issues


def multi_label_issues(probs: Tensor, targets: Tensor) -> list[LabelIssue]:
    """Flagged (image, tag) pairs, most suspicious first. ``probs`` and ``targets`` are
    (N, C): independent tag probabilities and 0/1 tags."""
    _check(probs, targets.shape[0])
    if targets.shape != probs.shape:
        raise InputError(f"targets {tuple(targets.shape)} and probabilities {tuple(probs.shape)} differ in shape")
    probs, positive = probs.to(torch.float64), targets.bool()
    issues: list[LabelIssue] = []
    for tag in range(probs.shape[1]):
        p, pos = probs[:, tag], positive[:, tag]
        if pos.any() and (~pos).any():  # a tag always or never given cannot be judged
            threshold = (p[pos].mean() + p[~pos].mean()) / 2  # between the models' two typical answers
            for i in torch.nonzero(~pos & (p >= threshold)).flatten().tolist():
                issues.append(LabelIssue(i, "missing_tag", tag, None, float(p[i]), True))
            for i in torch.nonzero(pos & (p < threshold)).flatten().tolist():
                issues.append(LabelIssue(i, "wrong_tag", tag, None, float(1.0 - p[i]), True))
    issues.sort(key=lambda issue: -issue.score)
    return issues


__all__ = ["LabelIssue", "multi_label_issues", "single_label_issues"]
