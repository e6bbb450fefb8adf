"""Split records into train / val / test, stratified so every class is measurable.

A random split of a skewed dataset easily leaves a rare class with no validation
image, and then its accuracy cannot be measured at all. So:

* **Explicit splits win.** A record whose source names its split (``record.split``)
  goes there and takes no part in the random assignment.
* **Single-label** data is split per class: a seeded shuffle inside each class, then
  ``round(n * fraction)`` images to test and to val. A class with at least 2 images
  gets at least 1 val image when ``val_fraction > 0``, and every class keeps at least
  1 training image (then, with ``test_fraction > 0`` and images to spare, 1 test).
* **Multi-label** data uses iterative stratification (Sechidis et al., 2011) from the
  ``iterative-stratification`` package, which assigns the rarest tags first so each
  tag's share is kept on both sides. It can still leave a 2-image tag entirely in
  train when the fraction is small (or hold out a 1-image tag), so a repair pass then
  moves single images (swapping one back, to keep the sizes) until every tag has a
  training image and every tag with at least 2 images is on both sides.
  Test is drawn first, then val from the rest; the counts are computed on the whole
  pool, so ``val_fraction`` stays a fraction of the whole dataset.

Randomness is seeded (per class for single-label, so adding a class does not reshuffle
the others) and each returned list keeps the input order.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Sequence

from tagmill.errors import InputError
from tagmill.formats.base import SourceRecord, TaskName

SPLITS = ("train", "val", "test")


def assign_splits(
    records: list[SourceRecord],
    task: TaskName,
    classes: Sequence[str],
    val_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, list[SourceRecord]]:
    """``{"train": [...], "val": [...], "test": [...]}`` (all three keys, lists may be empty).

    ``classes`` orders the tag columns for multi-label stratification; labels not in
    it are still handled. Fractions are of the records without an explicit split.
    """
    _check_fractions(val_fraction, test_fraction)
    if task not in ("single", "multi"):
        raise InputError(f"unknown task {task!r}; expected 'single' or 'multi'")
    where = [_explicit_split(r) for r in records]
    pool = [i for i, split in enumerate(where) if split is None]
    if task == "single":
        chosen = _split_single(records, pool, val_fraction, test_fraction, seed)
    else:
        chosen = _split_multi(records, pool, classes, val_fraction, test_fraction, seed)
    for i, split in chosen.items():
        where[i] = split
    out: dict[str, list[SourceRecord]] = {name: [] for name in SPLITS}
    for record, split in zip(records, where):
        out[split or "train"].append(record)
    return out


def _check_fractions(val: float, test: float) -> None:
    # Written as "not (ok)" so NaN fails too.
    if not (0 <= val < 1) or not (0 <= test < 1) or not (val + test < 1):
        raise InputError(
            f"split fractions must satisfy 0 <= val, 0 <= test and val + test < 1; "
            f"got val={val!r}, test={test!r}",
            hint="e.g. --val-fraction 0.1 --test-fraction 0.1 keeps 80% of the images for training",
        )


def _explicit_split(record: SourceRecord) -> str | None:
    if record.split is None:
        return None
    if record.split not in SPLITS:
        raise InputError(
            f"record {record.id!r} names split {record.split!r}; expected one of {', '.join(SPLITS)}"
        )
    return record.split


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """``(n_val, n_test)`` for ``n`` images, with the minimums described in the module doc.

    Priority when images are scarce: 1 train, then 1 val, then 1 test.
    """
    if n < 2:
        return 0, 0
    slots = n - 1  # images that may leave train
    min_val = 1 if val_fraction > 0 else 0
    min_test = 1 if test_fraction > 0 and slots - min_val >= 1 else 0
    n_val = max(min_val, _round_half_up(n * val_fraction))
    n_test = max(min_test, _round_half_up(n * test_fraction))
    while n_val + n_test > slots:
        if n_test > min_test and (n_test >= n_val or n_val == min_val):
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def _round_half_up(x: float) -> int:
    """round() rounds 2.5 to 2 (banker's rounding); users expect 3."""
    return math.floor(x + 0.5)


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random("\x1f".join(["tagmill", str(seed), *parts]))


# ---------------------------------------------------------------- single-label


def _split_single(records: list[SourceRecord], pool: list[int], val: float, test: float,
                  seed: int) -> dict[int, str]:
    by_class: dict[str, list[int]] = {}
    for i in pool:
        labels = records[i].labels
        by_class.setdefault(labels[0] if labels else "", []).append(i)
    chosen: dict[int, str] = {}
    for name, indices in by_class.items():
        n_val, n_test = split_sizes(len(indices), val, test)
        shuffled = list(indices)
        _rng(seed, "split", name).shuffle(shuffled)
        for k, i in enumerate(shuffled):
            chosen[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return chosen


# ----------------------------------------------------------------- multi-label


def _split_multi(records: list[SourceRecord], pool: list[int], classes: Sequence[str],
                 val: float, test: float, seed: int) -> dict[int, str]:
    n_val, n_test = split_sizes(len(pool), val, test)
    labels = [frozenset(records[i].labels) for i in pool]
    columns = list(dict.fromkeys(classes)) + sorted(set().union(*labels) - set(classes))
    chosen = {i: "train" for i in pool}
    rest = list(range(len(pool)))  # positions into pool / labels
    for split, count in (("test", n_test), ("val", n_val)):
        if count == 0:
            continue
        held = _held_out([labels[p] for p in rest], columns, count, seed)
        for k in sorted(held):
            chosen[pool[rest[k]]] = split
        rest = [p for k, p in enumerate(rest) if k not in held]
    return chosen


def _held_out(labels: list[frozenset[str]], columns: list[str], count: int, seed: int) -> set[int]:
    """Positions of about ``count`` records to hold out, stratified over tags."""
    import numpy as np  # imported late: scikit-learn is slow to import and rarely needed
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    index = {name: j for j, name in enumerate(columns)}
    # Padding with all-zero columns: scikit-learn only calls a matrix "multilabel" with
    # >= 2 columns, and an empty column is never picked by the algorithm (it changes nothing).
    y = np.zeros((len(labels), max(len(columns) + 1, 2)), dtype=np.int8)
    for row, tags in enumerate(labels):
        for tag in tags:
            y[row, index[tag]] = 1
    splitter = MultilabelStratifiedShuffleSplit(
        n_splits=1, test_size=count, random_state=seed % 2**32
    )
    _, held_idx = next(splitter.split(np.zeros((len(labels), 1)), y))
    held = {int(k) for k in held_idx}
    _ensure_both_sides(labels, held)
    return held


def _ensure_both_sides(labels: list[frozenset[str]], held: set[int]) -> None:
    """Move images so every tag is kept and every tag with >= 2 images is held out too.

    Works in place on ``held`` (positions held out; the rest are kept for training).
    Two passes, rarest tags first:

    1. every tag gets at least one kept image, even a 1-image tag the stratifier held
       out (a class the model never trains on is useless; the importer rejects it);
    2. every tag with >= 2 images gets a held-out one, moving only images whose other
       tags keep an image on the side they leave, so no earlier fix is undone.

    After each move one image goes the other way when that is safe, so sizes stay put.
    """
    total: Counter[str] = Counter()
    for tags in labels:
        total.update(tags)
    counts = {True: Counter(), False: Counter()}  # held? -> images per tag
    for k, tags in enumerate(labels):
        counts[k in held].update(tags)

    def move(k: int) -> None:
        side = k in held
        counts[side].subtract(labels[k])
        counts[not side].update(labels[k])
        if side:
            held.discard(k)
        else:
            held.add(k)

    def safe(k: int) -> bool:
        """Whether record ``k`` can leave its side without emptying any tag there."""
        side = k in held
        return all(counts[side][t] >= 2 for t in labels[k])

    def pick(side: bool, tag: str | None, *, must_be_safe: bool, exclude: int = -1) -> int | None:
        """A record on ``side`` (carrying ``tag``), safest first, then fewest tags."""
        found = [
            k for k, tags in enumerate(labels)
            if (k in held) == side and k != exclude and (tag is None or tag in tags)
        ]
        if must_be_safe:
            found = [k for k in found if safe(k)]
        return min(found, key=lambda k: (not safe(k), len(labels[k]), k), default=None)

    def fix(tag: str, missing_side: bool, must_be_safe: bool) -> None:
        mover = pick(not missing_side, tag, must_be_safe=must_be_safe)
        if mover is None:
            return
        move(mover)
        partner = pick(missing_side, None, must_be_safe=True, exclude=mover)
        if partner is not None:
            move(partner)

    rarest_first = sorted(total, key=lambda t: (total[t], t))
    for tag in rarest_first:
        if counts[False][tag] == 0:
            fix(tag, missing_side=False, must_be_safe=False)
    for tag in rarest_first:
        if total[tag] >= 2 and counts[True][tag] == 0:
            fix(tag, missing_side=True, must_be_safe=True)


__all__ = ["assign_splits", "split_sizes", "SPLITS"]
