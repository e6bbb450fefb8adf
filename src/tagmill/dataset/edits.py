"""``--drop-ids`` and ``--relabel``: act on what ``tagmill doctor`` found, by image id.

The doctor names mislabelled images, duplicates and outliers by the id the dataset's
shards store (the source's own id, ``val/``-prefixed for a ``--val-from`` source), so
a user fixes the data by re-importing with two files:

* ``--drop-ids FILE``: ids to leave out. Either plain text, one id a line (blank lines
  and ``#`` comments ignored), or a CSV whose header has an ``id`` column (the
  doctor's ``label_issues.csv`` and ``outliers.csv``) or, lacking one, an ``id_b``
  column (``duplicates.csv`` lists pairs ``id_a,...,id_b,...``: dropping the second
  of each pair keeps one copy).
* ``--relabel FILE``: a CSV with ``id`` and ``labels`` columns; the labels replace the
  record's. A single-label cell is one class name; a multi-label cell is split into
  tags on the first of ``,`` ``|`` ``;`` that the file's cells use (as
  :mod:`tagmill.formats.csv_labels` detects them, but never on spaces: a tag may be
  several words), and an empty one means "no tag".

Why edits run where they do in the import (after ``--derive`` and ``--val-list``,
before ``--keep``/``--drop``/``--min-per-class``/``--balance``):

* after the ids are final: ``val/`` prefixes are added when the sources are read,
  and the doctor reports those prefixed ids;
* after label rules: the doctor judged the labels of the dataset it was given, which
  are the derived ones ("other" vs "thriller"), so a relabel names derived classes;
* before the sampling filters: those count images per class, and the counts must be
  the corrected ones (a balanced dataset stays balanced after fixing its labels);
* before any image is decoded: a dropped image costs nothing.

An id listed in both files is dropped (a relabel of an image that is gone means
nothing), and the report says so. Ids that match no record are reported, not fatal
(a later import may have fewer images), but a file that matches *no* record at all
is an error: it is almost surely the wrong file, or a dataset of other ids.

Everything here is pure except :func:`read_drop_ids` / :func:`read_relabel`, which
read a file through :mod:`tagmill.storage` (so ``s3://`` works) and parse it.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from typing import Any

from tagmill import storage
from tagmill.errors import InputError
from tagmill.formats.base import Skip, SourceRecord, TaskName
from tagmill.formats.csv_labels import detect_separator, make_splitter

#: id columns of a drop CSV, in order of preference (``id_b``: the doctor's duplicates.csv)
DROP_ID_COLUMNS = ("id", "id_b")
RELABEL_COLUMNS = ("id", "labels")
#: unknown ids quoted in a report line before "..."
_SHOWN_IDS = 5

_DROP_HINT = (
    "give one id per line, or a CSV with an 'id' column (or 'id_b', as in tagmill doctor's duplicates.csv)"
)
_RELABEL_HINT = "the relabel file is a CSV with a header naming an 'id' and a 'labels' column"


# ------------------------------------------------------------------------ parsing


def read_drop_ids(location: str) -> set[str]:
    """The ids listed by the ``--drop-ids`` file at ``location``."""
    return parse_drop_ids(_read_text(location), location)


def read_relabel(location: str, task: TaskName) -> dict[str, tuple[str, ...]]:
    """The new labels by id of the ``--relabel`` file at ``location``."""
    return parse_relabel(_read_text(location), location, task)


def parse_drop_ids(text: str, name: str) -> set[str]:
    """Ids from a text file (one a line) or a CSV with an ``id`` / ``id_b`` column.

    It is a CSV when its first line holds a comma and a column named ``id`` or
    ``id_b`` (``id`` wins when both are there); a CSV row with an empty id is ignored.
    """
    if "," in text.split("\n", 1)[0]:
        header, rows = _table(text, name)
        found = [_find(header, c) for c in DROP_ID_COLUMNS]
        column = next((i for i in found if i is not None), None)
        if column is not None:
            return {fields[column] for _, fields in _reaching(rows, column, header, name, _DROP_HINT) if fields[column]}
    ids = set()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.add(line)
    return ids


def parse_relabel(text: str, name: str, task: TaskName) -> dict[str, tuple[str, ...]]:
    """``{id: labels}`` from a CSV with ``id`` and ``labels`` columns.

    Single-label: each cell must be exactly one class name. Multi-label: cells are
    split on the first of the tag separators a tags CSV source may use (``,`` ``|``
    ``;``) that any cell holds, never on spaces: a suggested tag may be several words
    ("Science Fiction") and stand alone in every cell; ``tagmill doctor`` writes ``|``.
    An empty cell is an image with no tag.
    """
    header, rows = _table(text, name)
    id_col, label_col = (_find(header, c) for c in RELABEL_COLUMNS)
    if id_col is None or label_col is None:
        missing = [c for c, i in zip(RELABEL_COLUMNS, (id_col, label_col)) if i is None]
        found = ", ".join(map(repr, header)) if header else "an empty file"
        raise InputError(f"{name}: line 1: no {' or '.join(map(repr, missing))} column (found: {found})", hint=_RELABEL_HINT)
    cells = [(line, fields[id_col], fields[label_col])
             for line, fields in _reaching(rows, max(id_col, label_col), header, name, _RELABEL_HINT)]
    # task None: detect a separator character only; "multi" would also split on spaces
    split = make_splitter(detect_separator([cell for _, _, cell in cells], "single" if task == "single" else None))
    labels: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    for line, record_id, cell in cells:
        if not record_id:
            raise InputError(f"{name}: line {line}: empty id", hint=_RELABEL_HINT)
        tags = split(cell)
        if task == "single" and len(tags) != 1:
            raise InputError(
                f"{name}: line {line}: {record_id!r} needs exactly one class in a single-label dataset, got {cell!r}",
                hint="in a single-label dataset each id gets one class name",
            )
        if record_id in labels and set(labels[record_id]) != set(tags):
            raise InputError(
                f"{name}: line {line}: {record_id!r} is relabelled differently on line {first_line[record_id]}"
            )
        labels.setdefault(record_id, tags)
        first_line.setdefault(record_id, line)
    return labels


def _read_text(location: str) -> str:
    data = storage.read_bytes(location)  # missing or unreachable: a StorageError, as for every file
    try:
        return data.decode("utf-8-sig")  # drops a byte-order mark, as storage.read_text does
    except UnicodeDecodeError as exc:
        raise InputError(f"{location} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                         hint="pass a text file of ids, or a CSV") from exc


def _table(text: str, name: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (first non-blank row) and the non-blank rows after it, as
    ``(line, stripped fields)``; a line number is where its row starts."""
    # strict: an unclosed quote must not swallow the rest of the file into one field
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    line = 1
    try:
        for row in reader:
            fields = [f.strip() for f in row]
            if any(fields):
                rows.append((line, fields))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise InputError(f"{name}: line {line}: not a readable CSV ({exc})") from exc
    if not rows:
        return [], []
    return rows[0][1], rows[1:]


def _reaching(rows: list[tuple[int, list[str]]], column: int, header: list[str], name: str, hint: str,
              ) -> list[tuple[int, list[str]]]:
    """``rows``, each checked to have a field at ``column``."""
    for line, fields in rows:
        if len(fields) <= column:
            raise InputError(f"{name}: line {line}: {len(fields)} field(s) where the header has {len(header)}", hint=hint)
    return rows


def _find(header: list[str], column: str) -> int | None:
    names = [h.lower() for h in header]
    return names.index(column) if column in names else None


# ----------------------------------------------------------------------- applying


@dataclass
class Edited:
    """The records after the edits, the classes they may have added, and what was done."""

    records: list[SourceRecord]
    classes: list[str]
    #: ``{"drop_ids": {...}, "relabel": {...}}``, only the parts that were asked for
    report: dict[str, Any] = field(default_factory=dict)
    #: one "unknown-id" Skip per file that listed ids the source does not have
    skipped: list[Skip] = field(default_factory=list)


def apply_edits(
    records: list[SourceRecord],
    classes: list[str],
    *,
    drop_ids: set[str] | None = None,
    drop_file: str = "--drop-ids",
    relabel: dict[str, tuple[str, ...]] | None = None,
    relabel_file: str = "--relabel",
    sort_classes: bool | None = None,
) -> Edited:
    """Drop the ``drop_ids`` records and give the ``relabel`` ones their new labels.

    Record order is kept. A class the relabel introduces is added to ``classes``:
    in sorted position when ``sort_classes`` (None: when ``classes`` is sorted
    already, as the importer sorts the labels it finds), else at the end, so the
    existing classes keep their indices (``--derive``'s negative class stays 0).
    """
    known = {r.id for r in records}
    edited = Edited(list(records), list(classes))
    if drop_ids is not None:
        matched = _check_matches(drop_ids, known, drop_file, "--drop-ids", edited)
        edited.records = [r for r in edited.records if r.id not in drop_ids]
        edited.report["drop_ids"] = {
            "file": drop_file, "listed": len(drop_ids), "dropped": matched, "unknown": len(drop_ids) - matched,
        }
    if relabel is not None:
        matched = _check_matches(set(relabel), known, relabel_file, "--relabel", edited)
        relabelled = unchanged = 0
        out = []
        for r in edited.records:
            new = relabel.get(r.id)
            if new is None:
                out.append(r)
            elif set(new) == set(r.labels):
                unchanged += 1
                out.append(r)
            else:
                relabelled += 1
                out.append(replace(r, labels=new))
        edited.records = out
        edited.report["relabel"] = {
            "file": relabel_file,
            "listed": len(relabel),
            "relabelled": relabelled,
            "unchanged": unchanged,
            "unknown": len(relabel) - matched,
            # listed in both files: dropping wins
            "dropped_instead": matched - relabelled - unchanged,
        }
        edited.classes = _add_classes(edited.classes, edited.records, sort_classes)
    return edited


def _check_matches(listed: set[str], known: set[str], file: str, option: str, edited: Edited) -> int:
    """How many ``listed`` ids the source has; an error when none (and a Skip for the rest)."""
    matched = len(listed & known)
    if not matched:
        what = "lists no id" if not listed else f"lists {len(listed)} id(s), none of them in the source"
        sample = ", ".join(sorted(known)[:3])
        raise InputError(
            f"{option} {file} {what}",
            hint=f"is it the right file? the source's ids look like {sample}" if known else None,
        )
    unknown = sorted(listed - known)
    if unknown:
        edited.skipped.append(
            Skip(file, "unknown-id", f"{len(unknown)} ids not in the source, e.g. {', '.join(unknown[:_SHOWN_IDS])}")
        )
    return matched


def _add_classes(classes: list[str], records: list[SourceRecord], sort_classes: bool | None) -> list[str]:
    have = set(classes)
    new = sorted({t for r in records for t in r.labels if t not in have})
    if not new:
        return classes
    if sort_classes if sort_classes is not None else classes == sorted(classes):
        return sorted(classes + new)
    return classes + new


def describe_edits(report: dict[str, Any]) -> list[str]:
    """One line per edit for the import summary."""
    lines = []
    drop = report.get("drop_ids")
    if drop:
        extra = f" ({drop['unknown']:,} listed ids not in the source)" if drop["unknown"] else ""
        lines.append(f"dropped {_images(drop['dropped'])} listed in {drop['file']}{extra}")
    relabel = report.get("relabel")
    if relabel:
        notes = [
            f"{relabel['unchanged']:,} already so labelled" if relabel["unchanged"] else "",
            f"{relabel['dropped_instead']:,} dropped instead (listed in both files)" if relabel["dropped_instead"] else "",
            f"{relabel['unknown']:,} listed ids not in the source" if relabel["unknown"] else "",
        ]
        notes = [n for n in notes if n]
        lines.append(f"relabelled {_images(relabel['relabelled'])} from {relabel['file']}"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    return lines


def _images(n: int) -> str:
    return f"{n:,} image{'' if n == 1 else 's'}"


__all__ = [
    "Edited",
    "apply_edits",
    "describe_edits",
    "parse_drop_ids",
    "parse_relabel",
    "read_drop_ids",
    "read_relabel",
]
