"""The head, fitted to convergence on cached features, its regularisation chosen by k-fold.

With the backbone frozen, training the head is a convex problem: multinomial logistic
regression (single-label) or one logistic regression per tag (multi-label) on the
pooled features. A few epochs of SGD stop far from its optimum; full-batch L-BFGS
(torch's own) reaches it in well under a second per fit on a CPU. What remains is
the one choice that matters, the L2 strength, and it is chosen the honest way: k-fold
cross-validation over the *training* cache, folds grouped by image so that augmented
views of one image never sit on both sides. The validation split is never looked at.

The same folds give out-of-fold probabilities for every training image (each judged
by a head that never saw its label); multi-label thresholds are tuned on them.

Features are centred and divided by one overall scale before fitting, so that one
L2 grid fits every backbone, and the scaling is folded back into the weights (the
result is a plain ``nn.Linear`` on the raw features). The scale is deliberately not
per feature: in a pretrained network a unit's spread says how much it has to say, and
standardising each one lifted near-silent units to the level of the informative ones.
On the dev sets of ``bench/quality.py``, with avg+max pooling, one overall scale
against per-feature scaling: accuracy +6.2 and +0.2 points on the two single-label
sets, mAP −0.2 (160 px) and +2.6 (224 px) on outline drawings; its fits were also
faster (6.6 s instead of 9.5 s for 1,600 images × 1,280 features × 30 tags).

When the cache holds augmented views besides the plain one, cross-validation also
decides whether training on them helps (held-out images are always plain views):
augmentation that changes what an image shows can hurt a linear head.

With fewer rows than features (up to a few thousand images against ~4,000 pooled
features; see ``PROJECT_BELOW``), every fit runs in the span of the rows instead: an
L2-penalised linear model's weights lie in that span (any component outside it changes
no logit and only adds to the penalty), so fitting on the rows' coordinates in an
orthonormal basis of it gives the same optimum, exactly, at a fraction of the
arithmetic per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from tagmill.errors import InputError
from tagmill.objective import Objective

#: L2 strengths tried (loss = mean data loss + l2/2 · ‖W‖², features at one overall
#: scale). Cross-validation chose 0.01 to 1 on the dev sets of bench/quality.py (the
#: noisier and smaller the data, the stronger); the grid spans a decade below that and
#: a factor of three above.
L2_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
#: used when the data are too small to cross-validate (see ``choose_folds``): the strong
#: end of what cross-validation chose, as it did on the smallest dev set (192 images)
FALLBACK_L2 = 0.3
#: k of the k-fold; fewer when the rarest class has fewer images than this
FOLDS = 5
#: cross-validation fits on at most this many images (drawn with the seed); the final
#: fit uses them all. Keeps the choice of L2 at seconds for 250k-image datasets.
CV_MAX_IMAGES = 20_000
#: below this many multiply-adds per loss evaluation (N·D·C) the fit runs on one thread:
#: its many tiny tensor ops gain nothing from more, and each one waits for every
#: OpenMP thread, which on a busy machine costs a scheduler slice: 13 s instead of
#: 0.3 s per fit was measured on 2 cores with one other busy process
ONE_THREAD_BELOW = 1 << 28
#: L-BFGS iterations (full batch) of the final fit, and of each cross-validation fit:
#: choosing L2 needs the ranking of the strengths, not the last digits of each optimum,
#: and warm starts along the L2 path begin each fit close to its solution
MAX_ITER, CV_MAX_ITER = 200, 40


@dataclass
class HeadFit:
    weight: Tensor | None  #: (C, D), for the raw (unstandardised) features; None with final=False
    bias: Tensor | None  #: (C,)
    l2: float  #: the L2 strength chosen
    #: cross-validated score (the task's selection metric) per L2 strength tried, with
    #: the views chosen
    cv_scores: dict[float, float]
    folds: int  #: 0 when the data were too small to cross-validate
    views_used: int  #: how many of the cached views the head was trained on (1: the plain view)
    #: (N, C) out-of-fold probabilities of the plain view at the chosen L2; None without CV
    oof_probs: Tensor | None
    oof_targets: Tensor | None
    message: str  #: one line saying what was chosen, and why

    def load_into(self, linear: torch.nn.Linear) -> None:
        with torch.no_grad():
            linear.weight.copy_(self.weight.to(linear.weight))
            linear.bias.copy_(self.bias.to(linear.bias))


@dataclass
class Population:
    """The whole training set, when ``fit_head`` is handed only the rows cross-validation
    draws from it (``cv_rows``): a pass over train too large to hold (threshold tuning on
    fine-tuned features) keeps those rows and the moments over every row, no more."""

    rows: int  #: N, the training images in all
    mean: Tensor  #: (D,) per-feature means over all N rows (``RunningMoments``)
    std: Tensor  #: (D,) the one overall scale over all N rows


def fits_on_a_sample(task: Objective, rows: int, dim: int, *, views: int = 1) -> bool:
    """Whether ``fit_head(final=False)`` over ``rows`` training images can be handed only
    their ``cv_rows`` and a ``Population``: multi-label (a single-label fold check counts
    every class over all rows), more rows than cross-validation draws, and too many rows
    to project onto their span (that basis needs every row)."""
    return not task.single and rows > CV_MAX_IMAGES and rows * views > PROJECT_BELOW * dim


def fit_head(
    views: list[Tensor],
    targets: Tensor,
    task: Objective,
    *,
    seed: int = 0,
    grid: tuple[float, ...] = L2_GRID,
    folds: int = FOLDS,
    device: torch.device | None = None,
    final: bool = True,
    population: Population | None = None,
) -> HeadFit:
    """Fit a linear head on ``views`` (each (N, D): view 0 plain, others augmented, rows
    aligned by image) with ``targets`` ((N,) class indices or (N, C) multi-hot).
    ``final=False`` stops after cross-validation (the out-of-fold probabilities are what
    threshold tuning needs; the head over every row is then never fitted).

    ``population``: ``views`` and ``targets`` are only the ``cv_rows(population.rows,
    seed)`` of a larger training set, in order; the result is the one the whole set
    would give (up to the float rounding of the moments). Multi-label, ``final=False``
    and more rows than ``CV_MAX_IMAGES`` only: a single-label fold check counts every
    class over all rows, and the final fit reads every row."""
    device = device or torch.device("cpu")
    rows = population.rows if population is not None else len(targets)
    if population is not None and (final or len(targets) != CV_MAX_IMAGES
                                   or not fits_on_a_sample(task, rows, views[0].shape[1], views=len(views))):
        raise ValueError("fit_head(population=...) takes the CV_MAX_IMAGES rows drawn from a larger multi-label set "
                         "of more rows than features can span, final=False")
    size = rows * len(views) * views[0].shape[1] * task.num_outputs(targets)  # as for all the rows: same threads, same sums
    threads = _intra_op_threads_for(size, device)
    # fits held at one thread each leave the other cores idle: the folds' fits, which are
    # independent, run side by side on them instead (each still on one thread, so the
    # same arithmetic in the same order: the same numbers)
    side_by_side = torch.get_num_threads() if threads == 1 else 1
    with intra_op_threads(threads):
        return _fit_head(views, targets, task, seed=seed, grid=grid, folds=folds, device=device, final=final,
                         population=population, side_by_side=side_by_side)


def _fit_head(
    views: list[Tensor], targets: Tensor, task: Objective, *, seed: int, grid: tuple[float, ...], folds: int,
    device: torch.device, final: bool, population: Population | None = None, side_by_side: int = 1,
) -> HeadFit:
    # The views are the run's feature cache (at 250k images, gigabytes): nothing below
    # copies them whole. Standardising happens a chunk at a time inside each fit, and
    # cross-validation copies only the rows it uses (at most CV_MAX_IMAGES).
    views = [v.to(device, torch.float32) for v in views]
    targets = targets.to(device)
    num_classes = task.num_outputs(targets)
    dim = views[0].shape[1]
    if population is not None:  # fits_on_a_sample: too many rows to project onto their span
        mean, std = population.mean.to(device, torch.float32), population.std.to(device, torch.float32)
        basis = None
    else:
        mean, std = _moments(views)
        rows = sum(len(v) for v in views)
        basis = _row_basis(torch.cat(views) - mean) if rows <= PROJECT_BELOW * dim else None  # (D, r): few rows only

    def standardised(x: Tensor) -> Tensor:
        return _project((x - mean) / std, basis)

    def standardised_rows(x: Tensor, rows: Tensor) -> Tensor:
        """``standardised(x[rows])`` (the same numbers) in the gathered copy itself: at
        the CV_MAX_IMAGES cap each temporary of ``(x - mean) / std`` is another 20,000
        rows (68 MB at 848 features), and two of them were alive beside the copy."""
        gathered = x[rows]  # a new tensor, never an inference one, so it can be changed in place
        return _project(gathered.sub_(mean).div_(std), basis)

    k, why = choose_folds(targets, task, folds)
    scores: dict[float, float] = {}
    oof = None
    if k:
        fold_of = _assign_folds(targets, task, k, seed, limit=CV_MAX_IMAGES)  # (N,) fold index, -1 = not in CV
        in_cv = fold_of >= 0
        cv_rows = in_cv.nonzero().flatten()
        cv_views = [standardised_rows(v, cv_rows) for v in views]
        # candidates: (number of views trained on, L2); ties go to fewer views, then stronger L2
        candidates: dict[tuple[int, float], float] = {}
        oofs: dict[tuple[int, float], Tensor] = {}
        fold_heads: dict[tuple[int, float], tuple[Tensor, Tensor]] = {}

        def best(among) -> tuple[int, float]:
            return max(among, key=lambda c: _preference(candidates[c], *c))

        for count in sorted({1, len(views)}):
            tried = grid if count == 1 else _near_best(grid, candidates)
            cv_scores, (kept_l2, kept_oof), cv_heads = _cross_validate(cv_views[:count], targets[cv_rows], task,
                                                                       num_classes, fold_of[cv_rows], k, tried,
                                                                       side_by_side=side_by_side)
            candidates.update({(count, g): v for g, v in cv_scores.items()})
            # only the winner's out-of-fold table is used, and the winner is the best of
            # some count: each count keeps its best table (20,000 x C floats each)
            oofs[(count, kept_l2)] = kept_oof  # best([(count, g) for g in cv_scores]): _preference decides both
            fold_heads.update({(count, g): h for g, h in cv_heads.items()})
            del kept_oof
        del cv_views
        used, l2 = best(candidates)
        scores = {g: candidates[(used, g)] for g in grid if (used, g) in candidates}
        views = views[:used]
        oof = (oofs[(used, l2)], targets[in_cv].cpu())
        # a fold's head at the chosen L2 solves nearly the same problem: starting there, the
        # final fit over every row (the costly one at 250k images) needs a fraction of the steps
        start = fold_heads[(used, l2)]
        on = "the plain view" if used == 1 else f"all {used} views"
        compared = ""
        if len(views) > 1:
            with_views = ", ".join(f"{g:g}" for (c, g) in candidates if c > 1)
            compared = f"; {'augmented views did not help' if used == 1 else 'augmented views helped'} (tried at L2 {with_views})"
        message = (
            f"head: L2 {l2:g}, trained on {on}, chosen by {k}-fold cross-validation on the training features "
            f"({task.selection_metric} {scores[l2]:.4f}; L2 tried {', '.join(f'{g:g}' for g in grid)}{compared})"
        )
    else:
        l2, used, start = FALLBACK_L2, len(views), None
        message = f"head: {why}; L2 {l2:g} used without cross-validation"

    if not final:
        return HeadFit(None, None, l2, scores, k, used, oof[0] if oof else None, oof[1] if oof else None, message)
    weight, bias = _fit(views, targets, task, num_classes, l2, prepare=standardised, init=start)
    if basis is not None:
        weight = weight @ basis.T  # back from the rows' coordinates: (C, r) -> (C, D)
    # fold the standardisation into the layer: W·(x-μ)/σ + b = (W/σ)·x + (b - W·μ/σ)
    weight = weight / std  # (C, D)
    bias = bias - weight @ mean  # (C,)
    return HeadFit(
        weight.cpu(), bias.cpu(), l2, scores, k, used, oof[0] if oof else None, oof[1] if oof else None, message
    )


def out_of_fold_probabilities(
    features: Tensor, targets: Tensor, task: Objective, *, l2: float, folds: int = FOLDS, seed: int = 0,
    device: torch.device | None = None,
) -> tuple[Tensor, int]:
    """(N, C) probabilities for *every* row of ``features`` (N, D), each from a head fitted
    at ``l2`` on the other folds, and the k used. Unlike the cross-validation inside
    :func:`fit_head`, which samples at most ``CV_MAX_IMAGES`` to choose L2, this judges
    all N: ``tagmill doctor`` needs an honest probability for each image it may flag."""
    device = device or torch.device("cpu")
    k, why = choose_folds(targets, task, folds)
    if not k:
        raise InputError(f"cannot judge labels out of fold: {why}", hint="labels need at least 2 images per class")
    x = features.to(device, torch.float32)
    mean, std = _moments([x])
    centred = x - mean
    x = _project(centred / std, _row_basis(centred))
    y = targets.to(device)
    num_classes = task.num_outputs(y)
    fold_of = _assign_folds(y, task, k, seed, limit=len(y))
    probs = torch.zeros(len(y), num_classes)
    with intra_op_threads(_intra_op_threads_for(x.numel() * num_classes, device)):
        for fold in range(k):
            held = fold_of == fold
            weight, bias = _fit([x[~held]], y[~held], task, num_classes, l2)
            probs[held.cpu()] = task.probabilities(x[held] @ weight.T + bias).cpu()
    return probs, k


def _near_best(grid: tuple[float, ...], plain: dict[tuple[int, float], float]) -> tuple[float, ...]:
    """The L2 strengths worth trying with augmented views: the plain view's best and its
    neighbours, two steps weaker (augmentation regularises, so the views' optimum moves
    toward weaker L2) and one stronger. Each view multiplies a fit's cost, so trying
    half the grid halves the dearest part of the search (on 2 views × 2,400 images ×
    3,968 features it was the larger share of the head fit)."""
    ordered = sorted(grid)
    best = ordered.index(max((g for (_, g) in plain), key=lambda g: _preference(plain[(1, g)], 1, g)))
    return tuple(ordered[max(0, best - 2) : best + 2])


def _intra_op_threads_for(size: int, device: torch.device) -> int:
    """torch's intra-op threads for a fit of ``size`` multiply-adds per loss evaluation
    (N·D·C): one below ``ONE_THREAD_BELOW`` on the CPU, else as many as torch may use."""
    return 1 if device.type == "cpu" and size < ONE_THREAD_BELOW else torch.get_num_threads()


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads at ``count`` inside the block, as they were after it (the
    count is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_folds(targets: Tensor, task: Objective, folds: int) -> tuple[int, str]:
    """k for the k-fold (0: cannot cross-validate) and, when 0, why not."""
    if task.single:
        # a class needs an image in each training side and one held out
        counts = torch.bincount(targets)
        smallest = int(counts[counts > 0].min()) if len(targets) else 0
        k = min(folds, smallest)
        if k < 2:
            return 0, f"a class has only {smallest} training image(s), too few to cross-validate"
        return k, ""
    if len(targets) < 2 * folds:
        return 0, f"only {len(targets)} training images, too few to cross-validate"
    return folds, ""


# --- fitting ------------------------------------------------------------------------------


def _moments(views: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-feature means and one overall standard deviation (as a (D,) vector), see above,
    over every row of ``views``, a chunk at a time (no copy of the data)."""
    rows = sum(len(v) for v in views)
    # a chunk at a time: ``v.sum(0, dtype=torch.float64)`` casts the whole view to float64
    # first, a copy twice its size (225,000 x 848 features: 1.5 GB, the trainer's peak at 250k)
    total = sum((chunk.sum(0, dtype=torch.float64) for v in views for chunk in _chunks(v)),
                views[0].new_zeros(views[0].shape[1], dtype=torch.float64))  # (D,)
    mean = (total / rows).to(views[0].dtype)
    squares = sum(((chunk - mean).pow(2).sum(dtype=torch.float64) for v in views for chunk in _chunks(v)),
                  torch.zeros((), dtype=torch.float64))
    # all-constant features would divide by zero; leave them unscaled
    scale = (squares / (rows * mean.numel())).sqrt().clamp_min(1e-6).to(mean.dtype)  # ()
    return mean, scale.expand_as(mean)


class RunningMoments:
    """``_moments`` over rows that arrive a batch at a time and are not kept (a pass over
    train for threshold tuning): float64 sums of x and x² per feature. The centred sum
    of squares then comes from Σx² − 2μΣx + Nμ² with μ the float32 mean, as ``_moments``
    centres on it; the two differ by float rounding only, unless a feature's mean were
    millions of times its spread (float64 keeps 16 digits of the cancelling terms)."""

    def __init__(self) -> None:
        self.rows = 0
        self.total: Tensor | None = None  #: (D,) float64 Σx
        self.squares: Tensor | None = None  #: (D,) float64 Σx²

    def add(self, x: Tensor) -> None:
        x = x.to(torch.float64)  # (B, D): one batch's copy
        if self.total is None:
            self.total, self.squares = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1])
        self.rows += len(x)
        self.total += x.sum(0)
        self.squares += x.pow(2).sum(0)

    def result(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(mean, std) as ``_moments`` gives them."""
        if self.total is None or not self.rows:
            raise ValueError("no rows to take moments of")
        mean = (self.total / self.rows).to(dtype)
        mu = mean.to(torch.float64)
        centred = (self.squares - 2 * mu * self.total + self.rows * mu.pow(2)).sum().clamp_min(0)
        scale = (centred / (self.rows * mean.numel())).sqrt().clamp_min(1e-6).to(dtype)  # ()
        return mean, scale.expand_as(mean)


#: rows per chunk are chosen so a chunk holds about this many numbers (64 MB of float32):
#: big enough that each matrix product keeps the cores busy, small enough that a fit's
#: temporaries stay a sliver of a 250k-image cache
CHUNK_ELEMENTS = 1 << 24
#: a fit's rows are gathered (a fold's) and standardised once per fit, not in every loss
#: evaluation, when the copy takes at most this many bytes: L-BFGS evaluates the loss
#: 40-200 times a fit, and re-gathering took as long as the products themselves (the
#: doctor on 3,060 Fashion-MNIST images: 36 of its fits' 106 s); a larger set keeps a
#: fit's memory at a chunk (at cross-validation's 20,000 rows of 3,968 features the copy
#: would be 317 MB beside the cache)
PREPARE_ONCE_BYTES = 1 << 27


def _chunks(x: Tensor, rows_of: Tensor | None = None) -> Iterator[Tensor]:
    """``x``'s rows (or its rows ``rows_of``, gathered a chunk at a time) in chunks."""
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    if rows_of is None:
        for start in range(0, len(x), step):
            yield x[start:start + step]
    else:
        for start in range(0, len(rows_of), step):
            yield x[rows_of[start:start + step]]


#: project onto the rows' span when it has at most this share of the feature dimensions:
#: each L-BFGS step then costs that share, while the QR and the projection (each about
#: N/(2C) steps' worth of arithmetic) are paid once against the ~2,000 steps of a
#: cross-validated search (8 strengths x 5 folds x ~45 evaluations). Measured on 2
#: cores with 3,968 features (doctor bench data, 10 and 30 outputs): at 0.51 the
#: label check's search took 24 s instead of 42, at 0.77 a train head fit 33 s instead
#: of 39, at 0.96 50.4 s against 50.5 (break-even); 0.5 before left those gains unused
PROJECT_BELOW = 0.9


def _row_basis(rows: Tensor) -> Tensor | None:
    """(D, r) orthonormal basis of the span of ``rows`` (N, D), or None when projecting
    would not pay (see ``PROJECT_BELOW``)."""
    n, dim = rows.shape
    if n > PROJECT_BELOW * dim:
        return None
    # reduced QR of the transpose: Q's N columns span every row (and more, if rank-deficient)
    return torch.linalg.qr(rows.T, mode="reduced").Q


def _project(rows: Tensor, basis: Tensor | None) -> Tensor:
    return rows if basis is None else rows @ basis


def _fit(
    views: list[Tensor], targets: Tensor, task: Objective, num_classes: int, l2: float,
    init: tuple[Tensor, Tensor] | None = None, max_iter: int = MAX_ITER,
    prepare: Callable[[Tensor], Tensor] | None = None, rows_of: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Minimise mean loss over every view + l2/2·‖W‖² with full-batch L-BFGS.

    ``prepare`` maps raw rows to the rows fitted on (standardised, projected); it runs a
    chunk at a time inside each loss evaluation, so the data are never copied whole.
    ``rows_of``: fit on these rows of each view only (a fold's; ``targets`` are theirs),
    gathered a chunk at a time too. Each chunk's loss is weighted by its share of the
    rows and back-propagated at once: the gradient is the full batch's, the memory a
    chunk's. Rows that fit in ``PREPARE_ONCE_BYTES`` are gathered and prepared once per
    fit instead (the same chunks, the same numbers)."""
    rows = len(rows_of) * len(views) if rows_of is not None else sum(len(v) for v in views)
    if (rows_of is not None or prepare is not None) and \
            rows * views[0].shape[1] * views[0].element_size() <= PREPARE_ONCE_BYTES:
        # the very chunks each loss evaluation would make, made once (the same numbers)
        views = [torch.cat([prepare(c) if prepare else c for c in _chunks(v, rows_of)]) for v in views]
        rows_of = prepare = None
    prepare = prepare or (lambda x: x)
    # features cached under inference mode cannot enter autograd: a normal copy of the
    # targets (small), and of each chunk where ``prepare`` made none
    targets = targets.clone() if targets.is_inference() else targets
    dim = prepare(views[0][:1]).shape[1]
    device = views[0].device
    weight = torch.zeros(num_classes, dim, device=device) if init is None else init[0].clone()
    bias = torch.zeros(num_classes, device=device) if init is None else init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-5, tolerance_change=1e-9,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for view in views:
            start = 0
            for chunk in _chunks(view, rows_of):
                x = prepare(chunk)  # (n, D')
                x = x.clone() if x.is_inference() else x
                y = targets[start:start + len(chunk)]  # (n,) | (n, C)
                start += len(chunk)
                part = task.loss(x @ weight.T + bias, y) * (len(chunk) / rows)
                part.backward()
                total += part.detach()
        penalty = 0.5 * l2 * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _cross_validate(
    views: list[Tensor], targets: Tensor, task: Objective, num_classes: int, fold_of: Tensor, k: int,
    grid: tuple[float, ...], *, side_by_side: int = 1,
) -> tuple[dict[float, float], tuple[float, Tensor], dict[float, tuple[Tensor, Tensor]]]:
    """Per L2 strength: the selection metric over pooled out-of-fold predictions, and the
    last fold's head (a warm start for the final fit); and the best strength with its
    out-of-fold predictions (ties to the stronger L2, as ``fit_head`` breaks them).

    Strengths run outer and folds inner, each fold warm-starting from its own head at
    the previous (stronger) L2: the same fits as folds outer, strengths inner, but only
    two (N, C) tables are alive at once (the one being filled and the best so far)
    instead of one per strength: at the CV_MAX_IMAGES cap with 183 tags, 29 MB instead
    of 117 MB for the eight strengths of ``L2_GRID``.

    ``side_by_side``: threads fitting a strength's folds at once (they are independent;
    each fit's rows are gathered per fit, so that many copies are alive at once, each at
    most ``PREPARE_ONCE_BYTES``)."""
    in_cv = (fold_of >= 0).nonzero().flatten()  # images taking part, in order
    position = torch.full_like(fold_of, -1)
    position[in_cv] = torch.arange(len(in_cv), device=fold_of.device)
    truth = targets[in_cv].cpu()
    folds = [((fold_of == fold).nonzero().flatten(), ((fold_of >= 0) & (fold_of != fold)).nonzero().flatten())
             for fold in range(k)]
    previous: list[tuple[Tensor, Tensor] | None] = [None] * k  # each fold's head at the last strength fitted
    scores: dict[float, float] = {}
    models: dict[float, tuple[Tensor, Tensor]] = {}
    best: tuple[float, Tensor] | None = None
    pool = ThreadPoolExecutor(min(side_by_side, k), thread_name_prefix="tagmill-fold") if side_by_side > 1 else None

    def fit_fold(fold: int, l2: float) -> tuple[Tensor, Tensor]:
        return _fit(views, targets[folds[fold][1]], task, num_classes, l2, init=previous[fold],
                    max_iter=CV_MAX_ITER, rows_of=folds[fold][1])

    # strongest regularisation first: each fold's solution warm-starts its next, weaker one
    try:
        for l2 in sorted(grid, reverse=True):
            oof = torch.zeros(len(in_cv), num_classes)
            fitted = pool.map(fit_fold, range(k), [l2] * k) if pool else (fit_fold(fold, l2) for fold in range(k))
            for fold, head in enumerate(fitted):
                previous[fold] = head
                held = folds[fold][0]
                logits = views[0][held] @ head[0].T + head[1]  # (H, C) plain view only
                oof[position[held].cpu()] = task.probabilities(logits).cpu()
            models[l2] = previous[-1]
            scores[l2] = task.selection_score(oof, truth)
            if best is None or _preference(scores[l2], 1, l2) > _preference(scores[best[0]], 1, best[0]):
                best = (l2, oof)  # the view count is the same for every strength here
            del oof
    finally:
        if pool is not None:
            pool.shutdown()
    assert best is not None  # grid is never empty
    return {g: scores[g] for g in grid}, best, models  # in the grid's order, as reported


def _preference(score: float, views: int, l2: float) -> tuple[float, int, float]:
    """How candidates (a score, the number of views trained on, an L2 strength) are
    ranked, the largest best: by score (NaN, a metric with nothing to score, below all),
    ties to fewer views, then to the stronger L2."""
    return (score if score == score else -float("inf"), -views, l2)


def cv_rows(n: int, seed: int, limit: int | None = None) -> Tensor:
    """The positions (ascending) of the rows ``fit_head`` cross-validates on out of ``n``
    training images with ``seed``: all of them, or ``limit`` drawn at random. A pass that
    cannot hold all ``n`` keeps these (see ``Population``)."""
    return _drawn(n, CV_MAX_IMAGES if limit is None else limit, torch.Generator().manual_seed(seed))


def _drawn(n: int, limit: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=generator)[:limit].sort().values if n > limit else torch.arange(n)


def _assign_folds(targets: Tensor, task: Objective, k: int, seed: int, *, limit: int) -> Tensor:
    """(N,) fold index per image, stratified (iteratively for tags); -1 for images left
    out of cross-validation when there are more than ``limit``."""
    n = len(targets)
    generator = torch.Generator().manual_seed(seed)
    chosen = _drawn(n, limit, generator)
    y = targets.cpu()[chosen]
    fold_of = torch.full((n,), -1, dtype=torch.long)
    if task.single:
        # deal each class's images round-robin over the folds, in a seeded order
        order = torch.randperm(len(chosen), generator=generator)
        for c in y.unique():
            members = order[y[order] == c]
            fold_of[chosen[members]] = torch.arange(len(members)) % k
    else:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for fold, (_, held) in enumerate(splitter.split(torch.zeros(len(chosen), 1).numpy(), y.numpy())):
            fold_of[chosen[torch.as_tensor(held)]] = fold
    return fold_of.to(targets.device)


__all__ = [
    "CV_MAX_IMAGES", "FALLBACK_L2", "FOLDS", "HeadFit", "L2_GRID", "Population", "RunningMoments", "choose_folds", "cv_rows",
    "fit_head", "fits_on_a_sample", "intra_op_threads", "out_of_fold_probabilities",
]
