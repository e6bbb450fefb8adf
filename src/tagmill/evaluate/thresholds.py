"""Per-tag decision thresholds tuned on validation data.

One global threshold (fastai's 0.2) suits no tag in particular: a rare tag's
probabilities rarely climb as high as a common one's. So each tag gets the grid value
that maximises its own F-beta on the validation split. The scores come from
torchmetrics (``multilabel_fbeta_score`` with ``average=None``: one F-beta per tag),
one call per grid value; the loop runs over the ~20 grid values, never over samples,
and keeps memory at one (N, C) decision matrix.

Rules:

* ``default`` is always a candidate, and a tie keeps the candidate closest to it, so
  the tuned threshold never scores below ``default`` on the validation data and does
  not wander away from it without a gain.
* A tag with no positive in the validation data keeps ``default``: its F-beta is 0
  at every threshold, so there is nothing to tune on.
* With ``min_positives``, a tag needs that many positives to get a threshold of its
  own; the others share one, the grid value that maximises micro F-beta over all tags.
  A threshold estimated from a few dozen positives mostly fits their noise: on the dev
  tag set of ``bench/quality.py`` (15–190 positives per tag) thresholds of their own
  for every tag scored micro-F1 1.2 points below one shared threshold on held-out
  images, although they scored 0.6 higher on the data they were tuned on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import multilabel_fbeta_score

from tagmill.errors import InputError
from tagmill.evaluate.metrics import _check_probs, _check_tag_targets, multilabel_score


#: positives a tag needs for a threshold of its own where training tunes thresholds
#: (tags with fewer share one; see the module docstring)
OWN_THRESHOLD_MIN_POSITIVES = 100


def default_grid() -> Tensor:
    """0.05, 0.10, ..., 0.95 (19 values)."""
    return torch.linspace(0.05, 0.95, 19)


def tune_thresholds(
    probs: Tensor,
    targets: Tensor,
    *,
    beta: float = 1.0,
    grid: Tensor | None = None,
    default: float = 0.5,
    min_positives: int = 0,
) -> Tensor:
    """The threshold (C,) maximising each tag's F-beta on ``probs``/``targets`` (N, C);
    tags with fewer than ``min_positives`` positives share the threshold that maximises
    micro F-beta over all tags."""
    probs = _check_probs(probs)
    targets = _check_tag_targets(targets, probs.shape)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0 or not math.isfinite(beta):
        raise InputError(f"beta must be a positive number, got {beta!r}")
    if isinstance(default, bool) or not isinstance(default, (int, float)) or not 0 <= default <= 1:
        raise InputError(f"default threshold must be a number in [0, 1], got {default!r}")
    candidates = _candidates(grid, float(default)).to(probs.device)  # (G,)

    scores = _fbeta_per_threshold(probs, targets, candidates, beta=float(beta))  # (G, C)
    choice = _best_nearest(scores, candidates, float(default))  # (C,) index into candidates
    thresholds = candidates[choice]  # (C,)
    positives = targets.sum(0)  # (C,)
    tuned = torch.where(positives > 0, thresholds, torch.full_like(thresholds, float(default)))
    if min_positives <= 0:
        return tuned
    micro = torch.stack([
        multilabel_score(multilabel_fbeta_score, probs, targets, beta=float(beta), threshold=float(t), average="micro")
        for t in candidates
    ])  # (G,)
    shared = candidates[_best_nearest(micro.unsqueeze(1), candidates, float(default))]  # (1,)
    return torch.where(positives >= min_positives, tuned, shared.expand_as(tuned))


def _fbeta_per_threshold(probs: Tensor, targets: Tensor, thresholds: Tensor, *, beta: float) -> Tensor:
    """F-beta of every tag at every threshold: (G, C) for G thresholds and checked (N, C) inputs."""
    rows = [
        multilabel_score(multilabel_fbeta_score, probs, targets, beta=beta, threshold=float(t), average=None)
        for t in thresholds
    ]
    return torch.stack(rows)  # (G, C)


def _candidates(grid: Tensor | None, default: float) -> Tensor:
    if grid is None:
        grid = default_grid()
    if not isinstance(grid, Tensor) or grid.ndim != 1 or len(grid) == 0:
        raise InputError("grid must be a non-empty 1-d tensor of thresholds")
    grid = grid.detach().float().cpu()
    if not bool(((grid >= 0) & (grid <= 1)).all()):
        raise InputError("grid thresholds must lie in [0, 1]")
    return torch.unique(torch.cat([grid, torch.tensor([default])]))  # (G,) sorted


def _best_nearest(scores: Tensor, candidates: Tensor, default: float) -> Tensor:
    """Per column of ``scores`` (G, C), the best row; among ties the candidate nearest ``default``."""
    best = scores.max(dim=0).values  # (C,)
    # float noise: equal F-scores reached through different counts may differ in the last bit
    is_best = scores >= best - 1e-9  # (G, C)
    distance = (candidates - default).abs().unsqueeze(1).expand_as(scores)  # (G, C)
    return torch.where(is_best, distance, torch.full_like(distance, math.inf)).argmin(dim=0)  # (C,)
