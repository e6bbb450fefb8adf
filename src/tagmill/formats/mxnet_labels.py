"""Turning MXNet label numbers into class names, shared by the .lst and .rec readers.

Both MXNet formats store labels as floats: one per image (single-label), or several
per image, which are either class indices (``3 7``) or one 0/1 column per class
(``0 1 0 1``). This module decides which, checks every row against that decision,
and names the classes: ``options.class_names`` when given, the image folders when they
match the indices one-to-one (Caltech ``001.ak47/...`` with label 0), else "0", "1"...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tagmill.formats.base import Skip, SourceOptions, TaskName

#: with "auto", this many identical-width 0/1 columns or more are read as one-hot; two
#: 0/1 columns are more likely two class indices ("0 1": classes 0 and 1)
MIN_ONEHOT_COLUMNS = 3


@dataclass(frozen=True)
class RawLabels:
    """The label numbers of one row/record, before they are given meaning."""

    source: str  #: Skip.source if the row is refused ("train.lst:7", "data.rec@1024")
    where: str  #: prefix of Skip.detail ("line 7", "record 12")
    values: tuple[int, ...]  #: already checked to be non-negative integers
    #: folder components of the image's relative path (.lst only): naming candidates
    folders: tuple[str, ...] = ()


@dataclass
class Labelling:
    """What the label numbers mean: one entry of ``labels`` per input row."""

    #: class names per row, in input order; None where the row was refused
    labels: list[tuple[str, ...] | None]
    skipped: list[Skip] = field(default_factory=list)
    task: TaskName = "single"
    classes: list[str] = field(default_factory=list)
    #: a few words for ReadResult.description: "one-hot, 5 classes from folder names"
    summary: str = ""


def integral_label(value: float) -> int | None:
    """``value`` as a class index, or None when it is not a non-negative whole number.

    MXNet writes labels as floats ("3.000000"); 2.5, -1, NaN or inf cannot name a class.
    """
    if not math.isfinite(value) or value < 0 or value != int(value):
        return None
    return int(value)


def parse_label_text(text: str) -> int | None:
    """A label field of a .lst line ("1", "1.0", "0.000000") as an index, or None."""
    try:
        return integral_label(float(text))
    except ValueError:
        return None


def label_rows(rows: Sequence[RawLabels], options: SourceOptions) -> Labelling:
    """Give every row its class names, refusing rows that contradict the options."""
    fmt = _label_format(rows, options.label_format)
    multi = fmt == "onehot" or any(len(r.values) > 1 for r in rows)
    task: TaskName = options.task or ("multi" if multi else "single")
    indices: list[tuple[int, ...] | None] = []
    skipped: list[Skip] = []
    for row in rows:
        found, problem = _row_indices(row, fmt, task, options.class_names)
        indices.append(found)
        if problem:
            skipped.append(Skip(row.source, "malformed-row", f"{row.where}: {problem}"))
    names, classes, naming = _class_names(rows, indices, fmt, options.class_names)
    labels = [None if found is None else tuple(names[i] for i in found) for found in indices]
    kind = "one-hot" if fmt == "onehot" else ("multi-label" if task == "multi" else "single-label")
    summary = f"{kind}, {len(classes)} classes {naming}".rstrip()
    return Labelling(labels, skipped, task, classes, summary)


def _label_format(rows: Sequence[RawLabels], requested: str) -> str:
    if requested in ("index", "onehot"):
        return requested
    widths = {len(r.values) for r in rows}
    if len(widths) == 1 and min(widths) >= MIN_ONEHOT_COLUMNS:
        if all(v in (0, 1) for r in rows for v in r.values):
            return "onehot"
    return "index"


def _row_indices(
    row: RawLabels, fmt: str, task: TaskName, class_names: tuple[str, ...] | None
) -> tuple[tuple[int, ...] | None, str]:
    """The class indices of one row, or (None, why it is refused)."""
    if fmt == "onehot":
        bad = [v for v in row.values if v not in (0, 1)]
        if bad:
            return None, f"one-hot label columns must be 0 or 1, found {bad[0]}"
        found = tuple(k for k, v in enumerate(row.values) if v == 1)
    else:
        found = tuple(dict.fromkeys(row.values))  # several columns naming one class: one label
    if task == "single" and len(found) != 1:
        return None, f"{len(found)} labels but the task is single-label"
    if class_names is not None:
        beyond = [i for i in found if i >= len(class_names)]
        if beyond:
            return None, f"label {beyond[0]} but only {len(class_names)} class names were given"
    return found, ""


def _class_names(
    rows: Sequence[RawLabels],
    indices: Sequence[tuple[int, ...] | None],
    fmt: str,
    class_names: tuple[str, ...] | None,
) -> tuple[dict[int, str], list[str], str]:
    """(index -> name, classes in index order, how they were named)."""
    if class_names is not None:
        return dict(enumerate(class_names)), list(class_names), "from the given class names"
    if fmt == "onehot":
        # The columns themselves define the classes, even one that is never set.
        used = list(range(max((len(r.values) for r in rows), default=0)))
    else:
        used = sorted({i for found in indices if found for i in found})
        folders = _folder_names(rows, indices)
        if folders is not None:
            return folders, [folders[i] for i in used], "from folder names"
    names = {i: str(i) for i in used}
    return names, [names[i] for i in used], ""


def _folder_names(
    rows: Sequence[RawLabels], indices: Sequence[tuple[int, ...] | None]
) -> dict[int, str] | None:
    """index -> folder when some folder level matches the labels one-to-one, else None.

    Tries the first folder (``im2rec --list`` run on a folder-per-class root) and then
    the folder holding the image (a list made one level higher up).
    """
    kept = [(row.folders, found) for row, found in zip(rows, indices) if found is not None]
    if not kept or any(len(found) != 1 or not folders for folders, found in kept):
        return None
    for level in (0, -1):
        by_index: dict[int, str] = {}
        by_folder: dict[str, int] = {}
        for folders, (index,) in kept:
            by_index.setdefault(index, folders[level])
            by_folder.setdefault(folders[level], index)
            if by_index[index] != folders[level] or by_folder[folders[level]] != index:
                break
        else:
            return by_index
    return None
