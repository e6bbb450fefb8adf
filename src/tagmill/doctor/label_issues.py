"""Which labels look wrong, judged by models that never saw them.

Input: out-of-fold probabilities (``train.head_fit`` fits k heads on the cached
features; each image is scored by the head that did not train on it) and the given
labels. An image is flagged when the held-out models prefer another class to the given
one, and every image gets a score in [0, 1] so a user can read the list from the top:
the share of the best other class in the two-way contest between it and the given one,
``p[best] / (p[best] + p[given])``. For softmax heads that is the sigmoid of the logit
margin of the best other class over the given one, so the score is above 0.5 exactly
when the image is flagged; it ranks a label the models all but rule out (2%, the rest
split between two other classes) above one they give 20% against a clear favourite.

Chosen on the dev sets of ``bench/doctor.py`` (5% of labels flipped to a random other
class; precision at k = the number of wrong rows, of the flagged images in score order;
never tuned on the reported sets): Google emoji (240 images + 5 copies, k = 12) and
Fashion-MNIST's train set (3,000 + 60 copies, k = 152). The bench's planting, then the
same features re-planted with other seeds (10 more on emoji, k = 12; 5 more on
Fashion-MNIST, k = 153), all plantings summed:

    rule                                        emoji          Fashion-MNIST
    margin p[best] - p[given] (the old score)   7/12, 86/132   113/152, 654/917
    self-confidence 1 - p[given]                9/12, 90/132   131/152, 778/917
    p[best] / (p[best] + p[given]) (this one)   9/12, 94/132   131/152, 782/917
    1 - p[given] / mean p[given] of its class   9/12, 89/132   131/152, 782/917
    cleanlab's adjusted probabilities           8/12, 68/132   115/152, 678/917
    entropy / p[given]                          7/12, 79/132   126/152, 752/917

The probability margin ranks an image whose other-class probability is spread over
several classes low, however little its given class gets; the three rules that weigh
p[given] on its own scale beat it on both sets (by 12-14 points on Fashion-MNIST, by
less than one image per planting on emoji, where single plantings go either way). They
tie with each other within the noise (4 images in 917); this one is kept because its
score agrees with the flag.

Multi-label data is judged per (image, tag), with a threshold per tag halfway between
the models' mean probability on the images that have the tag and on those that do not
(tags differ in how sure the models get): a tag that is absent but predicted above it
looks *missing*; a tag that is present but predicted below it looks *wrong*.

The probabilities judged are first put *in context* (:func:`with_tag_context`): the
held-out heads see only the pixels, but an image's other tags say much about each tag
(a flag is rarely also a woman; "man" rarely comes without "person"). A second,
out-of-fold logistic regression per tag reads the head's logit for that tag and the
image's other given tags. On the multi-label dev set of ``bench/doctor.py`` (OpenMoji
black outlines: 30 tags the heads predict with a mAP of only 0.50; 5% of the rows with
a tag dropped or added, k = 103) precision at k went from 30/103 to 40/103 (sklearn's
equivalent at other strengths: 36 at 10× the L2 below, 40 at a tenth; the pixels'
nearest neighbours' tags as a further input, 37; a larger backbone or input size in
place of the context, 34-36).

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
from tagmill.train.head_fit import intra_op_threads


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
    probs = probs.to(torch.float64).clamp_min(0.0)
    n = probs.shape[0]
    rows = torch.arange(n)
    given = probs[rows, labels]
    others = probs.clone()
    others[rows, labels] = -1.0
    best_other, suggested = others.max(dim=1)
    flagged = best_other > given
    contest = best_other + given
    # the best other class's share of the two: sigmoid of its logit margin over the given class
    score = torch.where(contest > 0, best_other / contest.clamp_min(torch.finfo(torch.float64).tiny), 0.5)
    issues = [
        LabelIssue(i, "wrong_label", int(labels[i]), int(suggested[i]), float(score[i]), bool(flagged[i]))
        for i in range(n)
    ]
    issues.sort(key=lambda issue: (-issue.flagged, -issue.score))
    return issues


#: L2 strength of the context regression (on the sum of the log-losses: sklearn's C = 10)
CONTEXT_L2 = 0.1
#: folds of the context regression (each image is judged by the fits of the other folds)
CONTEXT_FOLDS = 5
#: rows a context fit trains on at most: beyond, a seeded sample (the regression has
#: C + 1 inputs per tag, so 20,000 rows pin it down; it bounds memory at 250,000 images)
CONTEXT_MAX_ROWS = 20_000


def _logit(p: Tensor) -> Tensor:
    eps = 1e-6  # a held-out probability of exactly 0 or 1 still gets a finite logit (in float32 too)
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def _fit_context(logit: Tensor, tags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per tag c: logistic regression of ``tags[:, c]`` on ``logit[:, c]`` and the other
    tags (all tags at once: the loss separates by tag). Returns (a, V, b): the logit's
    weight (C,), the other tags' weights (C, C; zero diagonal) and the bias (C,)."""
    c = tags.shape[1]
    off_diagonal = 1.0 - torch.eye(c, dtype=tags.dtype)
    a = torch.ones(c, dtype=tags.dtype, requires_grad=True)  # start from the head's own answer
    v = torch.zeros(c, c, dtype=tags.dtype, requires_grad=True)
    b = torch.zeros(c, dtype=tags.dtype, requires_grad=True)
    # 100 iterations: on the dev set the loss stopped moving (within 0.01 of 2,074) well before
    optimiser = torch.optim.LBFGS([a, v, b], max_iter=100, line_search_fn="strong_wolfe", tolerance_grad=1e-7)

    def closure() -> Tensor:
        optimiser.zero_grad()
        z = logit * a + tags @ (v * off_diagonal).T + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, tags, reduction="sum")
        loss = loss + CONTEXT_L2 / 2 * (a.pow(2).sum() + v.pow(2).sum())
        loss.backward()
        return loss

    optimiser.step(closure)
    return a.detach(), (v * off_diagonal).detach(), b.detach()


def with_tag_context(probs: Tensor, targets: Tensor, *, seed: int = 0) -> Tensor:
    """Held-out tag probabilities (N, C) re-estimated from each tag's own logit and the
    image's other given tags (see the module docstring), out of fold: an image's row is
    predicted by regressions fitted on the other folds. Tags always or never given keep
    their probabilities; so does everything when there are too few images to fold."""
    _check(probs, targets.shape[0])
    n, c = probs.shape
    if n < 2 * CONTEXT_FOLDS or c < 2:
        return probs
    # the whole set in float32 (250,000 × 183 tags: 183 MB a matrix); each fit in float64
    tags = targets.to(torch.float32)
    logit = _logit(probs.to(torch.float32))
    generator = torch.Generator().manual_seed(seed)
    fold = torch.randperm(n, generator=generator) % CONTEXT_FOLDS
    out = probs.to(torch.float32).clone()
    judged = (tags.sum(dim=0) > 0) & (tags.sum(dim=0) < n)
    # products of (rows × C) by (C × C): a second thread only adds synchronisation, and on a
    # busy machine spinning threads made each fold 20× slower (15 s instead of 0.7)
    with intra_op_threads(1):
        for k in range(CONTEXT_FOLDS):
            train = torch.nonzero(fold != k).flatten()
            if len(train) > CONTEXT_MAX_ROWS:
                train = train[torch.randperm(len(train), generator=generator)[:CONTEXT_MAX_ROWS]]
            a, v, b = (t.to(torch.float32) for t in _fit_context(logit[train].double(), tags[train].double()))
            held = torch.nonzero(fold == k).flatten()
            z = logit[held] * a + tags[held] @ v.T + b
            out[held[:, None], torch.nonzero(judged).flatten()[None, :]] = torch.sigmoid(z[:, judged])
    return out.to(probs.dtype)


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


__all__ = ["LabelIssue", "multi_label_issues", "single_label_issues", "with_tag_context"]
