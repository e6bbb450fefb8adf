"""``tagmill doctor``'s building blocks: what is wrong with a labelled dataset.

Work in progress (issue 9). Present: label issues ranked from out-of-fold probabilities
(``label_issues.py``) and nearest neighbours in feature space for duplicates, leakage
and outliers (``neighbours.py``). They read features and out-of-fold predictions that
``train/`` already computes (``train.features``, ``train.head_fit``); nothing here
trains or reads images.
"""

from tagmill.doctor.label_issues import LabelIssue, multi_label_issues, single_label_issues
from tagmill.doctor.neighbours import Neighbours, nearest_neighbours, similar_pairs

__all__ = [
    "LabelIssue",
    "Neighbours",
    "multi_label_issues",
    "nearest_neighbours",
    "similar_pairs",
    "single_label_issues",
]
