"""The ranking behind ``tagmill suggest``: uncertainty by margin or by distance to each
tag's threshold, and diversity that keeps near-copies out of one batch."""

from __future__ import annotations

import numpy as np
import pytest

from tagmill.bundle.suggest import choose, uncertainty
from tagmill.errors import InputError


def test_single_label_uncertainty_is_the_margin_between_the_two_best_classes() -> None:
    probs = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(uncertainty(probs, "single"), [1.0, 0.15, 0.8, 0.0])


def test_multi_label_uncertainty_is_the_closest_tag_to_its_own_threshold() -> None:
    thresholds = (0.2, 0.5)
    probs = np.array([
        [0.2, 0.0],  # first tag exactly at its threshold
        [0.6, 0.0],  # 0.4 above a 0.2 threshold: half the room to certainty (0.8)
        [0.1, 1.0],  # 0.1 below a 0.2 threshold: half the room; the second tag is certain
        [1.0, 0.0],  # certain on both
    ])
    np.testing.assert_allclose(uncertainty(probs, "multi", thresholds), [1.0, 0.5, 0.5, 0.0])


def _pool() -> tuple[np.ndarray, np.ndarray]:
    """100 single-label rows: 0-9 near-copies of one picture, the most uncertain of all
    (coin tosses between two classes); 10-99 distinct pictures, less uncertain."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(100, 64)).astype(np.float32)
    features[:10] = features[0] + 0.01 * rng.normal(size=(10, 64))
    margin = np.concatenate([np.full(10, 0.01), rng.uniform(0.1, 0.5, 90)])
    top = (1 + margin) / 2
    probs = np.stack([top, 1 - top], axis=1)
    return probs, features


def test_near_copies_fill_one_place_in_a_batch_not_all_of_it() -> None:
    probs, features = _pool()
    plain, _ = choose(probs, features, 5, task="single", pool_factor=1)
    assert set(plain.tolist()) <= set(range(10))  # uncertainty alone: five copies of one picture
    chosen, scores = choose(probs, features, 5, task="single")
    assert len(chosen) == len(set(chosen.tolist())) == 5
    assert sum(row < 10 for row in chosen) == 1  # one copy: the rest are other pictures
    assert chosen[0] < 10  # and the copies' group gives its most uncertain row, first
    assert list(scores[chosen]) == sorted(scores[chosen], reverse=True)
    others = np.setdiff1d(np.arange(10, 100), chosen)
    assert scores[chosen[1:]].min() >= np.quantile(scores[others], 0.5)  # still among the uncertain ones


def test_asking_for_everything_returns_everything_most_uncertain_first_and_bad_counts_are_refused() -> None:
    probs, features = _pool()
    chosen, scores = choose(probs[10:20], features[10:20], 50, task="single")
    assert sorted(chosen.tolist()) == list(range(10))
    assert list(scores[chosen]) == sorted(scores, reverse=True)
    with pytest.raises(InputError, match="at least 1"):
        choose(probs, features, 0, task="single")
