"""``tagmill doctor``: what is wrong with a labelled dataset.

    scan.py          one pass over the shards: ids, sizes, pixel digests, perceptual hashes,
                     colour thumbnails
    thumbnails.py    whether two thumbnails show one picture, once aligned
    neighbours.py    nearest neighbours in feature space, chunked (never N × N)
    label_issues.py  labels the held-out (k-fold) heads find unlikely
    duplicates.py    exact and near copies; leakage is a pair across splits
    outliers.py      isolated images, blank/tiny/extreme ones, scarce classes
    diagnose.py      the pipeline, from a dataset (and optionally a run or bundle)
    report.py        report.md/.html, the CSVs and doctor.json
    in_training.py   the short "data issues" section of a training run's report

The building blocks below read features and out-of-fold probabilities; only
``scan``, ``diagnose`` and ``report`` read images.
"""

from tagmill.doctor.label_issues import LabelIssue, multi_label_issues, single_label_issues, with_tag_context
from tagmill.doctor.neighbours import Neighbours, nearest_neighbours, similar_pairs

__all__ = [
    "LabelIssue",
    "Neighbours",
    "multi_label_issues",
    "nearest_neighbours",
    "similar_pairs",
    "single_label_issues",
    "with_tag_context",
]
