"""What is in a packed dataset, in numbers: :func:`summarize` reads the manifest (and, for
multi-label data, streams the training shards' label files to count which tags appear
together). ``summary_console.py`` prints it; ``contact_sheet.py`` draws samples.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tagmill.dataset.manifest import SPLITS, Manifest, load_manifest, shard_locations
from tagmill.dataset.shards import iter_shard

#: tag pairs listed by how often they appear together
DEFAULT_TOP_PAIRS = 10
#: how an image without tags is named wherever labels are shown
NO_TAGS = "(no tags)"


@dataclass
class DatasetSummary:
    dataset: str
    task: str  #: "single" or "multi"
    classes: list[str]
    #: images per split, splits in train/val/test order
    split_counts: dict[str, int]
    #: split -> class -> images (single-label) or tag positives (multi-label)
    class_counts: dict[str, dict[str, int]]
    #: multi-label images without any tag, per split (all zero for single-label)
    untagged: dict[str, int]
    #: largest / smallest training class count; inf when a class has no training image;
    #: None when there is no training split or no class
    imbalance: float | None
    largest_class: tuple[str, int] | None
    smallest_class: tuple[str, int] | None
    #: (tag, tag, training images with both), most frequent first (multi-label only)
    cooccurrence: list[tuple[str, str, int]] = field(default_factory=list)
    inputs: int | None = None  #: inputs the import looked at (None: no import report)
    skipped_count: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)  #: resize policy (manifest.image)
    source: dict[str, Any] = field(default_factory=dict)  #: manifest.source

    @property
    def total_images(self) -> int:
        return sum(self.split_counts.values())

    def class_total(self, name: str) -> int:
        return sum(counts.get(name, 0) for counts in self.class_counts.values())


def summarize(dataset: str, *, top_pairs: int = DEFAULT_TOP_PAIRS) -> DatasetSummary:
    """Everything ``tagmill inspect`` prints about ``dataset``.

    Counts come from the manifest; only tag co-occurrence (multi-label) reads the
    training shards, one sample at a time.
    """
    manifest = load_manifest(dataset)
    splits = _ordered_splits(manifest)
    train_counts = manifest.splits["train"].class_counts if "train" in manifest.splits else None
    imbalance, largest, smallest = _imbalance(manifest.classes, train_counts)
    pairs: list[tuple[str, str, int]] = []
    if manifest.task == "multi" and "train" in manifest.splits and top_pairs > 0:
        pairs = cooccurrence(_iter_labels(dataset, manifest, "train"), manifest.classes, top_pairs)
    report = manifest.report
    return DatasetSummary(
        dataset=dataset,
        task=manifest.task,
        classes=list(manifest.classes),
        split_counts={name: manifest.splits[name].count for name in splits},
        class_counts={
            name: {c: manifest.splits[name].class_counts.get(c, 0) for c in manifest.classes} for name in splits
        },
        untagged={name: manifest.splits[name].untagged for name in splits},
        imbalance=imbalance,
        largest_class=largest,
        smallest_class=smallest,
        cooccurrence=pairs,
        inputs=int(report["inputs"]) if "inputs" in report else None,
        skipped_count=int(report.get("skipped_count", 0)),
        skipped_by_reason={str(k): int(v) for k, v in report.get("skipped_by_reason", {}).items()},
        image=dict(manifest.image),
        source=dict(manifest.source),
    )


def _ordered_splits(manifest: Manifest) -> list[str]:
    """train, val, test first (the order people read them in), then anything else."""
    known = [name for name in SPLITS if name in manifest.splits]
    return known + sorted(name for name in manifest.splits if name not in SPLITS)


def _imbalance(
    classes: list[str], train_counts: dict[str, int] | None
) -> tuple[float | None, tuple[str, int] | None, tuple[str, int] | None]:
    if not classes or train_counts is None:
        return None, None, None
    counts = [(name, train_counts.get(name, 0)) for name in classes]
    # ties: the first class in manifest order, so the report is stable
    largest = max(counts, key=lambda item: item[1])
    smallest = min(counts, key=lambda item: item[1])
    ratio = math.inf if smallest[1] == 0 else largest[1] / smallest[1]
    return ratio, largest, smallest


def _iter_labels(dataset: str, manifest: Manifest, split: str) -> Iterator[list[str]]:
    for location in shard_locations(dataset, manifest, split):
        for sample in iter_shard(location):
            yield list(sample.meta.get("labels", []))  # the image bytes are dropped right here


def cooccurrence(labels: Iterable[list[str]], classes: list[str], top: int = DEFAULT_TOP_PAIRS) -> list[tuple[str, str, int]]:
    """The ``top`` pairs of tags that appear together most often, with their counts.

    Each pair is written in manifest class order; ties are broken by that order too, so
    the same dataset always gives the same list.
    """
    rank = {name: index for index, name in enumerate(classes)}

    def order(tag: str) -> tuple[int, str]:
        return (rank.get(tag, len(rank)), tag)  # unknown tags (should not happen) sort last

    counts: Counter[tuple[str, str]] = Counter()
    for tags in labels:
        counts.update(itertools.combinations(sorted(set(tags), key=order), 2))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], order(item[0][0]), order(item[0][1])))
    return [(a, b, n) for (a, b), n in ranked[:top]]


__all__ = ["DEFAULT_TOP_PAIRS", "NO_TAGS", "DatasetSummary", "cooccurrence", "summarize"]
