"""The convex head fit: convergence, regularisation chosen by k-fold, out-of-fold predictions."""

import pytest
import torch

from tagmill.evaluate.metrics import mean_average_precision
from tagmill.objective import objective
from tagmill.train.auto import MIN_SIDE, choose_cache_views, choose_input_size
from tagmill.train.head_fit import FALLBACK_L2, _assign_folds, fit_head


def blobs(n_per_class: int, classes: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    """Gaussian blobs around well-separated centres: (N, D) features, (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return features * 5 + 2, labels  # off-centre and scaled: the fit must standardise


def regularised_gradient(fit, features, targets, task) -> float:
    """Norm of the gradient of the objective the fit minimised, at its solution, in the
    scaled coordinates it was solved in (centred, one overall scale σ; weights there are W·σ)."""
    mean = features.mean(0)
    std = (features - mean).pow(2).mean().sqrt()
    x = (features - mean) / std
    w = (fit.weight * std).clone().requires_grad_(True)
    b = (fit.bias + fit.weight @ mean).clone().requires_grad_(True)
    loss = task.loss(x @ w.T + b, targets) + 0.5 * fit.l2 * w.pow(2).sum()
    loss.backward()
    return float(torch.cat([w.grad.flatten(), b.grad]).norm())


def test_head_converges_on_a_separable_problem():
    task = objective("single")
    features, labels = blobs(30, 4)
    fit = fit_head([features], labels, task)
    predictions = (features @ fit.weight.T + fit.bias).argmax(1)
    assert bool((predictions == labels).all())
    # at the optimum of the L2-regularised problem: the gradient vanishes
    assert regularised_gradient(fit, features, labels, task) < 1e-3
    assert fit.folds == 5 and set(fit.cv_scores) and fit.l2 in fit.cv_scores
    assert "5-fold" in fit.message


def test_multi_label_head_converges_and_gives_out_of_fold_probabilities():
    task = objective("multi")
    features, labels = blobs(25, 4)
    targets = torch.stack([labels == 0, labels == 1, (labels == 1) | (labels == 2)], 1).float()  # 3 tags
    targets[labels == 3] = 0  # a quarter of the images untagged
    fit = fit_head([features], targets, task)
    # every tag ranks all its positives above all its negatives (mAP picks the L2, so the
    # ranking, not the 0.5 crossing, is what it optimises; thresholds are tuned later)
    scores = features @ fit.weight.T + fit.bias  # (N, 3)
    for tag in range(3):
        positive = targets[:, tag].bool()
        assert scores[positive, tag].min() > scores[~positive, tag].max()
    assert regularised_gradient(fit, features, targets, task) < 1e-3
    assert fit.oof_probs.shape == targets.shape and torch.equal(fit.oof_targets, targets)
    assert mean_average_precision(fit.oof_probs, targets) > 0.95


def test_the_regularisation_is_chosen_by_held_out_training_data():
    """Noisy labels, fewer images than features: weak L2 overfits, cross-validation says so."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(120, 200, generator=g)
    direction = torch.randn(200, generator=g) / 200**0.5
    labels = (features @ direction + torch.randn(120, generator=g) > 0).long()
    fit = fit_head([features], labels, objective("single"), grid=(1e-4, 1e-1, 1.0))
    assert fit.cv_scores[fit.l2] == max(fit.cv_scores.values())
    assert fit.cv_scores[1e-4] < fit.cv_scores[1.0] and fit.l2 == 1.0


def test_augmented_views_of_one_image_share_a_fold():
    features, labels = blobs(10, 3)
    task = objective("single")
    folds = _assign_folds(labels, task, 5, seed=0, limit=10_000)
    assert sorted(folds.tolist()) == sorted([f for f in range(5) for _ in range(6)])  # 30 images, 6 per fold
    for c in range(3):  # stratified: each class spread evenly
        assert torch.bincount(folds[labels == c], minlength=5).tolist() == [2] * 5
    # out-of-fold probabilities come from the plain view, one row per image, however many views
    fit = fit_head([features, features + 0.01], labels, task)
    assert fit.oof_probs.shape == (30, 3)


def test_too_few_images_to_cross_validate_falls_back_with_a_reason():
    features, labels = blobs(1, 3)  # one image per class
    fit = fit_head([features], labels, objective("single"))
    assert fit.folds == 0 and fit.l2 == FALLBACK_L2 and fit.oof_probs is None
    assert "only 1 training image" in fit.message and "without cross-validation" in fit.message
    assert torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()


def test_a_tag_with_one_positive_still_cross_validates():
    features, labels = blobs(8, 3)
    targets = torch.stack([labels == 0, labels == 1, torch.zeros_like(labels, dtype=torch.bool)], 1).float()
    targets[0, 2] = 1  # the third tag has one positive
    fit = fit_head([features], targets, objective("multi"))
    assert fit.folds == 5 and torch.isfinite(fit.oof_probs).all()


@pytest.mark.parametrize(
    ("native", "side", "size"),
    [(224, 28, MIN_SIDE), (224, 64, 128), (224, 72, 160), (224, 100, 224), (224, 320, 224), (260, 90, 192), (224, 0, 224)],
)
def test_input_size_follows_the_images(native, side, size):
    choice = choose_input_size(native, side)
    assert choice.value == size and str(size) in choice.reason


def test_a_second_cache_view_only_when_it_is_cheap():
    assert choose_cache_views(224, 128).value == 2
    assert choose_cache_views(224, 224).value == 1
    assert choose_cache_views(224, 192).value == 1


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_fitting_in_the_span_of_the_rows_finds_the_same_head(monkeypatch, kind):
    """Fewer rows than features: the fit runs on the rows' coordinates in a basis of
    their span; it must reach the optimum of the full problem (gradient ~0 there) and
    the same head as a fit in all the feature dimensions."""
    import tagmill.train.head_fit as head_fit

    task = objective(kind)
    features, labels = blobs(8, 4, dim=200)  # 32 rows, 200 features: projected
    targets = labels if kind == "single" else torch.nn.functional.one_hot(labels, 4).float()
    projected = fit_head([features], targets, task, grid=(0.01, 0.1))
    assert regularised_gradient(projected, features, targets, task) < 1e-3
    monkeypatch.setattr(head_fit, "PROJECT_BELOW", 0.0)  # never project
    full = fit_head([features], targets, task, grid=(0.01, 0.1))
    assert projected.l2 == full.l2
    assert torch.allclose(projected.weight, full.weight, atol=1e-3 * float(full.weight.abs().max()))
    assert torch.allclose(projected.oof_probs, full.oof_probs, atol=1e-3)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_folds_fitted_side_by_side_give_the_very_same_head(kind):
    """A fit held at one thread fits its folds on the other cores at once: the same fits,
    each on one thread, so the same numbers to the bit as one fold after another."""
    from tagmill.train.head_fit import intra_op_threads

    task = objective(kind)
    features, labels = blobs(40, 5, dim=64, spread=1.5)  # overlapping: every fold's fit takes its steps
    targets = labels if kind == "single" else torch.nn.functional.one_hot(labels, 5).float()
    with intra_op_threads(4):  # the folds side by side (torch may use 4 threads here)
        together = fit_head([features], targets, task)
    with intra_op_threads(1):  # one fold after another
        apart = fit_head([features], targets, task)
    assert together.l2 == apart.l2 and together.cv_scores == apart.cv_scores
    assert torch.equal(together.oof_probs, apart.oof_probs)
    assert torch.equal(together.weight, apart.weight) and torch.equal(together.bias, apart.bias)


def test_moments_are_taken_a_chunk_at_a_time(monkeypatch):
    """_moments sums each chunk of rows in float64 (a float64 cast of a whole view was a
    copy twice the cache's size): the same means and scale as over the whole views."""
    from tagmill.train import head_fit

    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(1000, 8, generator=generator) * 3 + 5, torch.randn(1000, 8, generator=generator)]
    rows = torch.cat(views).double()
    mean = rows.mean(0)
    monkeypatch.setattr(head_fit, "CHUNK_ELEMENTS", 8 * 70)  # chunks of 70 rows
    got_mean, got_std = head_fit._moments(views)
    assert torch.allclose(got_mean.double(), mean, rtol=1e-6)
    assert torch.allclose(got_std.double(), (rows - mean.float().double()).pow(2).mean().sqrt().expand(8), rtol=1e-5)
