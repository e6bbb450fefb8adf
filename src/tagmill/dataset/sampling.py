"""Metadata-only filters and samplers applied between reading a source and packing it.

Every function takes a record list and returns ``(new_records, SamplingStep)``. None
decodes an image: they only look at labels, so they run in milliseconds even on
millions of records, before any expensive work.

Rules shared by all of them:

* **Order.** The output keeps the input's relative order; filters only remove.
* **Determinism.** Randomness comes from :class:`random.Random` seeded with the
  ``seed`` *and the class name*, never the global RNG. So the same input order and
  seed give the same output, and a class's sample does not change when another class
  is added or removed.
* **Single- vs multi-label.** In a single-label dataset a class *is* its images, so
  removing a class drops images. In a multi-label dataset an image carries several
  tags, so removing a tag removes it from the images, which stay (an image left with
  no tag is still a valid all-negative example; see :func:`drop_untagged`).

The :class:`SamplingStep` each returns says what was lost, so the importer can print
"min-per-class 10: dropped 120 images of 3 classes".
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from tagmill.dataset.rules import suggest
from tagmill.errors import InputError
from tagmill.formats.base import SourceRecord, TaskName


@dataclass(frozen=True)
class SamplingStep:
    """What one filter removed."""

    #: the option that ran, as a user would recognise it: "min-per-class 10", "balance"
    step: str
    #: images removed from the dataset
    images_dropped: int = 0
    #: per class/tag: how many images lost it (dropped, or, multi-label, had the tag removed)
    lost_per_class: dict[str, int] = field(default_factory=dict)
    #: classes/tags that were present before the step and are gone after it
    classes_removed: tuple[str, ...] = ()
    #: multi-label: tag occurrences removed from images that were kept
    tags_removed: int = 0

    def describe(self) -> str:
        """One line for the import summary."""
        parts = []
        if self.images_dropped:
            touched = sum(1 for n in self.lost_per_class.values() if n)
            of = f" of {touched} class{'es' if touched != 1 else ''}" if touched else ""
            parts.append(f"dropped {self.images_dropped} image{'s' if self.images_dropped != 1 else ''}{of}")
        if self.tags_removed:
            parts.append(f"removed {self.tags_removed} tag{'s' if self.tags_removed != 1 else ''} from images")
        if self.classes_removed:
            names = ", ".join(self.classes_removed[:8]) + (", ..." if len(self.classes_removed) > 8 else "")
            parts.append(f"removed class{'es' if len(self.classes_removed) != 1 else ''} {names}")
        return f"{self.step}: " + ("; ".join(parts) if parts else "nothing dropped")

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_dropped": self.images_dropped,
            "lost_per_class": dict(self.lost_per_class),
            "classes_removed": list(self.classes_removed),
            "tags_removed": self.tags_removed,
        }


@dataclass
class SamplingReport:
    """The steps of one import, in the order they ran (for the summary and report JSON)."""

    steps: list[SamplingStep] = field(default_factory=list)

    def add(self, result: tuple[list[SourceRecord], SamplingStep]) -> list[SourceRecord]:
        """Record a step's report and pass its records on: ``records = report.add(f(records))``."""
        records, step = result
        self.steps.append(step)
        return records

    @property
    def images_dropped(self) -> int:
        return sum(s.images_dropped for s in self.steps)

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps]

    def as_dict(self) -> dict[str, Any]:
        return {"images_dropped": self.images_dropped, "steps": [s.as_dict() for s in self.steps]}


# --------------------------------------------------------------------- helpers


def _check_task(task: str) -> None:
    if task not in ("single", "multi"):
        raise InputError(f"unknown task {task!r}; expected 'single' or 'multi'")


def _check_count(option: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"{option} must be a whole number >= 1, got {n!r}")
    return n


def _rng(seed: int, *parts: str) -> random.Random:
    """A private RNG for one purpose; string seeds are hashed stably across runs."""
    return random.Random("\x1f".join(["tagmill", str(seed), *parts]))


def _class_counts(records: Iterable[SourceRecord]) -> Counter[str]:
    """Images per class/tag (a record counts once per distinct label)."""
    counts: Counter[str] = Counter()
    for r in records:
        counts.update(set(r.labels))
    return counts


def _check_names(option: str, names: Iterable[str], records: list[SourceRecord],
                 classes: Sequence[str] | None) -> set[str]:
    """``names`` as a set, or InputError listing the unknown ones with suggestions."""
    wanted = set(names)
    known = set(classes or ()) | set(_class_counts(records))
    unknown = sorted(wanted - known)
    if unknown:
        details = []
        for name in unknown:
            close = suggest(name, known)
            details.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        sample = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
        raise InputError(f"{option}: unknown class{'es' if len(unknown) > 1 else ''} {', '.join(details)}",
                         hint=f"the classes are: {sample}")
    return wanted


def _remove_labels(step: str, records: list[SourceRecord], task: TaskName,
                   remove: set[str]) -> tuple[list[SourceRecord], SamplingStep]:
    """Remove classes: drop their images (single-label) or strip the tags (multi-label)."""
    before = _class_counts(records)
    lost: Counter[str] = Counter()
    out: list[SourceRecord] = []
    dropped = tags_removed = 0
    for r in records:
        gone = [label for label in r.labels if label in remove]
        if not gone:
            out.append(r)
            continue
        lost.update(set(gone))
        if task == "single":
            dropped += 1
        else:
            tags_removed += len(gone)
            out.append(replace(r, labels=tuple(label for label in r.labels if label not in remove)))
    after = _class_counts(out)
    return out, SamplingStep(
        step=step,
        images_dropped=dropped,
        lost_per_class=dict(sorted(lost.items())),
        classes_removed=tuple(sorted(c for c in before if c not in after)),
        tags_removed=tags_removed,
    )


def _keep_indices(step: str, records: list[SourceRecord], keep: set[int],
                  ) -> tuple[list[SourceRecord], SamplingStep]:
    """Keep records at positions ``keep`` (in input order) and report the rest as dropped."""
    out = [r for i, r in enumerate(records) if i in keep]
    dropped = [r for i, r in enumerate(records) if i not in keep]
    after = _class_counts(out)
    lost = _class_counts(dropped)
    return out, SamplingStep(
        step=step,
        images_dropped=len(dropped),
        lost_per_class=dict(sorted(lost.items())),
        classes_removed=tuple(sorted(c for c in lost if c not in after)),
    )


# ----------------------------------------------------------------- public API


def keep_classes(records: list[SourceRecord], keep: Iterable[str], task: TaskName, *,
                 classes: Sequence[str] | None = None) -> tuple[list[SourceRecord], SamplingStep]:
    """Keep only the classes named (``--keep``).

    Single-label: images of other classes are dropped. Multi-label: other tags are
    removed from the images, which stay. Names are checked against ``classes`` and
    the labels present, so a typo is an error rather than an empty dataset.
    """
    _check_task(task)
    wanted = _check_names("keep classes", keep, records, classes)
    if not wanted:
        raise InputError("keep classes: name at least one class to keep")
    present = set(_class_counts(records))
    return _remove_labels("keep-classes", records, task, present - wanted)


def drop_classes(records: list[SourceRecord], drop: Iterable[str], task: TaskName, *,
                 classes: Sequence[str] | None = None) -> tuple[list[SourceRecord], SamplingStep]:
    """Remove the classes named (``--drop``): single-label drops their images,
    multi-label strips the tags and keeps the images."""
    _check_task(task)
    unwanted = _check_names("drop classes", drop, records, classes)
    return _remove_labels("drop-classes", records, task, unwanted)


def drop_untagged(records: list[SourceRecord]) -> tuple[list[SourceRecord], SamplingStep]:
    """Drop images with no label at all (multi-label ``--skip-untagged``).

    Untagged images are legitimate negatives for a multi-label model, so they are
    kept unless the user asks; this is that ask.
    """
    keep = {i for i, r in enumerate(records) if r.labels}
    return _keep_indices("skip-untagged", records, keep)


def min_per_class(records: list[SourceRecord], n: int, task: TaskName,
                  ) -> tuple[list[SourceRecord], SamplingStep]:
    """Remove classes with fewer than ``n`` images: too few to learn or to validate.

    Single-label: their images are dropped. Multi-label: the tag is removed from its
    images (which stay). Tags are counted independently, so one pass is exact.
    """
    _check_task(task)
    n = _check_count("min per class", n)
    rare = {c for c, count in _class_counts(records).items() if count < n}
    return _remove_labels(f"min-per-class {n}", records, task, rare)


def max_per_class(records: list[SourceRecord], n: int, task: TaskName, seed: int = 0,
                  ) -> tuple[list[SourceRecord], SamplingStep]:
    """Cap every class at about ``n`` images (``--max-per-class``), chosen at random.

    Single-label: a seeded random subset of exactly ``n`` images per larger class.

    Multi-label: an exact cap is impossible (images share tags), so this is greedy:
    visit images in a seeded random order and keep an image if *any* of its tags has
    fewer than ``n`` kept images so far. Every tag then ends with at least
    ``min(n, its count)`` images; common tags can exceed ``n`` when they ride along
    with rare ones. Untagged images count toward no tag and are all kept (use
    :func:`drop_untagged` to remove them).
    """
    _check_task(task)
    n = _check_count("max per class", n)
    return _cap(f"max-per-class {n}", records, n, task, seed)


def balance(records: list[SourceRecord], task: TaskName, seed: int = 0,
            ) -> tuple[list[SourceRecord], SamplingStep]:
    """Undersample every class to the size of the rarest one (``--balance``).

    Only for single-label data: with tags, "the rarest class" would cap every other
    tag at a handful of images, which is never what anyone wants.
    """
    _check_task(task)
    if task == "multi":
        raise InputError("--balance applies to single-label datasets; use --max-per-class for tags")
    counts = _class_counts(records)
    if not counts:
        return list(records), SamplingStep(step="balance")
    return _cap("balance", records, min(counts.values()), task, seed)


def _cap(step: str, records: list[SourceRecord], n: int, task: TaskName, seed: int,
         ) -> tuple[list[SourceRecord], SamplingStep]:
    if task == "single":
        keep = _cap_single(records, n, seed)
    else:
        keep = _cap_multi(records, n, seed)
    return _keep_indices(step, records, keep)


def _cap_single(records: list[SourceRecord], n: int, seed: int) -> set[int]:
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.labels[0] if r.labels else "", []).append(i)
    keep: set[int] = set()
    for name, indices in by_class.items():
        chosen = indices if len(indices) <= n else _rng(seed, "cap", name).sample(indices, n)
        keep.update(chosen)
    return keep


def _cap_multi(records: list[SourceRecord], n: int, seed: int) -> set[int]:
    order = list(range(len(records)))
    _rng(seed, "cap-multi").shuffle(order)
    kept: Counter[str] = Counter()
    keep: set[int] = set()
    for i in order:
        tags = set(records[i].labels)
        if not tags or any(kept[t] < n for t in tags):
            keep.add(i)
            kept.update(tags)
    return keep


__all__ = [
    "SamplingStep",
    "SamplingReport",
    "keep_classes",
    "drop_classes",
    "drop_untagged",
    "min_per_class",
    "max_per_class",
    "balance",
]
