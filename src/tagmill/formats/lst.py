"""MXNet image lists (``.lst``): ``index TAB label [TAB label...] TAB relative/path.jpg``.

The list ``im2rec --list`` writes, and the input ``im2rec`` packs into RecordIO.
Paths are relative to ``options.images`` or, by default, to the list's own folder;
a path that would leave that folder is refused, never read.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from tagmill import storage
from tagmill.errors import SourceError, StorageError
from tagmill.formats.base import (
    FileImage,
    ReadResult,
    SourceOptions,
    SourceRecord,
    Skip,
    join_inside,
)
from tagmill.formats.mxnet_labels import RawLabels, label_rows, parse_label_text


@dataclass(frozen=True)
class _Row:
    """One well-formed line of the list."""

    line: int
    index: int
    labels: tuple[int, ...]
    relative: str  #: normalised '/'-separated path below the images root
    location: str  #: the image's full path or URL


class LstReader:
    def __init__(self, location: str, options: SourceOptions) -> None:
        self.location = location
        self.options = options
        self.root = options.images or _parent(location)

    def read(self) -> ReadResult:
        rows, skipped = self._parse(self._text())
        rows, missing = self._existing(rows)
        skipped += missing
        labelling = label_rows([self._raw(row) for row in rows], self.options)
        skipped += labelling.skipped
        records = [
            SourceRecord(str(row.index), labels, FileImage(row.location))
            for row, labels in zip(rows, labelling.labels)
            if labels is not None
        ]
        skipped.sort(key=_line_of)  # report in file order, whatever check refused a line
        description = f"MXNet .lst ({labelling.summary})"
        return ReadResult(records, skipped, labelling.task, labelling.classes, description)

    def _text(self) -> str:
        try:
            if not storage.exists(self.location):
                raise SourceError(f".lst file not found: {self.location}")
            if storage.isdir(self.location):
                raise SourceError(f"{self.location} is a folder, not a .lst file")
            return storage.read_text(self.location)
        except StorageError as exc:
            raise SourceError(f"cannot read .lst file {self.location}: {exc.message}") from exc

    def _parse(self, text: str) -> tuple[list[_Row], list[Skip]]:
        rows: list[_Row] = []
        skipped: list[Skip] = []
        seen: set[int] = set()
        # split("\n") rather than splitlines(): line numbers must match the user's editor
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            source = f"{self.location}:{number}"
            row = self._row(number, line)
            if isinstance(row, tuple):
                reason, problem = row
                skipped.append(Skip(source, reason, f"line {number}: {problem}"))
            elif row.index in seen:
                detail = f"line {number}: index {row.index} already used by an earlier line"
                skipped.append(Skip(source, "duplicate-id", detail))
            else:
                seen.add(row.index)
                rows.append(row)
        return rows, skipped

    def _row(self, number: int, line: str) -> _Row | tuple[str, str]:
        """The line as a row, or (skip reason, what is wrong with it)."""
        fields = [f.strip() for f in line.rstrip("\r").split("\t")]
        if len(fields) < 3:
            spaced = len(line.split()) >= 3  # a hand-written list with spaces for TABs
            hint = " (fields must be separated by TABs, not spaces)" if spaced else ""
            plural = "s" if len(fields) != 1 else ""
            return "malformed-row", f"expected index TAB label TAB path, found {len(fields)} field{plural}{hint}"
        index = _parse_index(fields[0])
        if index is None:
            return "malformed-row", f"index {fields[0]!r} is not a whole number"
        parsed = [parse_label_text(text) for text in fields[1:-1]]
        labels = tuple(value for value in parsed if value is not None)
        if len(labels) != len(parsed):
            bad = fields[1 + parsed.index(None)]
            return "malformed-row", f"label {bad!r} is not a class index (a whole number >= 0)"
        location = join_inside(self.root, fields[-1])
        if location is None:
            return "unsafe-path", f"path {fields[-1]!r} is outside the images folder {self.root}"
        relative = posixpath.normpath(fields[-1].replace("\\", "/"))
        return _Row(number, index, labels, relative, location)

    def _existing(self, rows: list[_Row]) -> tuple[list[_Row], list[Skip]]:
        """Rows whose image exists, and a "missing" Skip for each other row."""
        if not rows:
            return [], []  # nothing to look for: spare a listing of a possibly huge root
        present = _listing(self.root)
        kept: list[_Row] = []
        skipped: list[Skip] = []
        for row in rows:
            if _exists(row, present):
                kept.append(row)
            else:
                detail = f"line {row.line}: image not found: {row.location}"
                skipped.append(Skip(f"{self.location}:{row.line}", "missing", detail))
        return kept, skipped

    def _raw(self, row: _Row) -> RawLabels:
        folders = tuple(row.relative.split("/")[:-1])
        return RawLabels(f"{self.location}:{row.line}", f"line {row.line}", row.labels, folders)


def _parent(location: str) -> str:
    if storage.is_local(location) and "://" not in location:
        return os.path.dirname(location) or "."
    return posixpath.dirname(location.rstrip("/"))


def _parse_index(text: str) -> int | None:
    """MXNet writes indices as integers; "17.0" is accepted too, 1.5 or "abc" are not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _listing(root: str) -> set[str] | None:
    """Every file below ``root`` (one listing, even on S3), or None if it cannot be listed."""
    try:
        return set(storage.list_files(root))
    except StorageError:
        return None


def _exists(row: _Row, present: set[str] | None) -> bool:
    if present is not None and row.relative in present:
        return True
    # Asked per file only when the listing is unavailable, or for a local file it did
    # not show (case-insensitive disks, odd links): a stat there costs nothing.
    if present is None or storage.is_local(row.location):
        try:
            return storage.exists(row.location)
        except StorageError:
            return False
    return False


def _line_of(skip: Skip) -> int:
    tail = skip.source.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0
