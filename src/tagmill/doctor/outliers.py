"""Images unlike the rest, images that are barely images, and classes too small to trust.

Feature outliers are judged by *isolation*: one minus the mean cosine similarity to an
image's ``K`` nearest neighbours (in the whole dataset, and, for single-label data,
among the images of its own class). Isolation differs a lot between datasets (photos
spread more than icons), so the cut is relative: an image is flagged when its isolation
sits more than ``MAX_Z`` robust standard deviations (median and MAD) above the
median, the usual cut-off for the modified z-score.

Multi-label data has no "own class" (an image belongs to several tags, or none), so
only the dataset-wide test applies there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tagmill.dataset.manifest import Manifest
from tagmill.doctor.neighbours import Neighbours, nearest_neighbours
from tagmill.doctor.scan import ImageFacts

#: neighbours whose mean similarity measures isolation: one neighbour is fooled by a
#: single copy; five is a small neighbourhood that still exists for small classes
K = 5
#: modified z-score above which an isolation is an outlier (see the module docstring)
MAX_Z = 3.5
#: standard deviation of grey levels (0–255) below which an image is "nearly blank":
#: JPEG noise on a flat image stays under 1; a faint logo on white measured 4–10
BLANK_SPREAD = 2.0
#: shorter side in pixels below which an image is too small to show much: the backbones
#: downsample 32× before pooling, so a 32-pixel image is one feature-map cell. Only an
#: image small *for its dataset* is reported (under TINY_SHARE of the median shorter
#: side): in a set of 28-pixel clothes every image is that small, and a list of all of
#: them would bury the one broken thumbnail
TINY_SIDE = 32
TINY_SHARE = 0.5
#: longer side / shorter side above which squashing to a square distorts the content
#: beyond recognition (banners, strips, panoramas)
MAX_ASPECT = 4.0
#: a class with fewer training images than this cannot be learned reliably, nor
#: cross-validated (5 folds leave 1 image per held-out fold)
MIN_TRAIN = 10
#: with fewer validation images than this, one image moves the class's score by 20+ points
MIN_VAL = 5


@dataclass(frozen=True)
class Outlier:
    row: int
    reason: str  #: "undecodable", "nearly-blank", "tiny", "extreme-aspect", "unlike-any-image", "unlike-its-class"
    score: float  #: higher: more unusual (a modified z-score for the feature tests)
    detail: str


@dataclass(frozen=True)
class Scarce:
    label: str
    split: str
    count: int
    needed: int
    problem: str


def _robust_z(values: Tensor) -> Tensor:
    median = values.median()
    mad = (values - median).abs().median().clamp_min(1e-6)
    return 0.6745 * (values - median) / mad  # 0.6745: MAD to standard deviation, for normal data


def _isolation(neighbours: Neighbours) -> Tensor:
    return 1.0 - neighbours.similarity[:, :K].mean(dim=1)


def image_outliers(facts: list[ImageFacts]) -> list[Outlier]:
    found = []
    sides = sorted(min(f.width, f.height) for f in facts if not f.error)
    tiny = min(TINY_SIDE, TINY_SHARE * sides[len(sides) // 2]) if sides else TINY_SIDE
    for row, fact in enumerate(facts):
        if fact.error:
            found.append(Outlier(row, "undecodable", 1.0, fact.error))
            continue
        short, long = sorted((fact.width, fact.height))
        if fact.spread < BLANK_SPREAD:
            found.append(Outlier(row, "nearly-blank", BLANK_SPREAD - fact.spread, f"grey levels vary by {fact.spread:.1f} of 255"))
        if short < tiny:
            found.append(Outlier(row, "tiny", (TINY_SIDE - short) / TINY_SIDE, f"{fact.width}×{fact.height} pixels"))
        if short and long / short > MAX_ASPECT:
            found.append(Outlier(row, "extreme-aspect", long / short, f"{fact.width}×{fact.height} pixels"))
    return found


def feature_outliers(features: Tensor, neighbours: Neighbours, class_of: Tensor | None) -> list[Outlier]:
    """``class_of`` (N,) class index per row for single-label data, else None."""
    found = []
    if neighbours.similarity.shape[1] >= K:
        z = _robust_z(_isolation(neighbours))
        for row in torch.nonzero(z > MAX_Z).flatten().tolist():
            found.append(Outlier(row, "unlike-any-image", float(z[row]), f"mean similarity to its {K} nearest images "
                                 f"{float(neighbours.similarity[row, :K].mean()):.3f}"))
    if class_of is not None:
        isolation = torch.full((len(features),), float("nan"))
        for c in class_of.unique().tolist():
            members = torch.nonzero(class_of == c).flatten()
            if len(members) > K:
                isolation[members] = _isolation(nearest_neighbours(features[members], K))
        known = ~isolation.isnan()
        if known.sum() > K:
            z = torch.full_like(isolation, float("nan"))
            z[known] = _robust_z(isolation[known])
            for row in torch.nonzero(z > MAX_Z).flatten().tolist():
                found.append(Outlier(row, "unlike-its-class", float(z[row]),
                                     f"mean similarity to the {K} nearest images of its class {1 - float(isolation[row]):.3f}"))
    return found


def scarce_labels(manifest: Manifest) -> list[Scarce]:
    """Classes or tags with too few training images to learn, or validation images to judge."""
    found = []
    for label in manifest.classes:
        train = manifest.splits["train"].class_counts.get(label, 0) if "train" in manifest.splits else 0
        if train < MIN_TRAIN:
            found.append(Scarce(label, "train", train, MIN_TRAIN, "too few to learn"))
        if "val" in manifest.splits and manifest.splits["val"].count:
            val = manifest.splits["val"].class_counts.get(label, 0)
            if val < MIN_VAL:
                found.append(Scarce(label, "val", val, MIN_VAL, "too few to validate"))
    found.sort(key=lambda s: (s.count, s.split, s.label))
    return found


__all__ = ["K", "MAX_Z", "Outlier", "Scarce", "feature_outliers", "image_outliers", "scarce_labels"]
