"""Readers for the formats users already have, and the factory that picks one.

Each format lives in its own module and is imported only when used, so reading a
folder never imports the RecordIO code and vice versa.
"""

from __future__ import annotations

import importlib
import posixpath

from tagmill import storage
from tagmill.errors import SourceError
from tagmill.formats.base import (
    FileImage,
    ReadResult,
    Reader,
    RecordIOImage,
    SourceOptions,
    SourceRecord,
    Skip,
    TaskName,
)

#: format name -> "module:ReaderClass"; each class is built as ``Reader(location, options)``
READERS: dict[str, str] = {
    "folder": "tagmill.formats.folder:FolderReader",
    "csv": "tagmill.formats.csv_labels:CsvReader",
    "onehot": "tagmill.formats.onehot:OneHotCsvReader",
    "lst": "tagmill.formats.lst:LstReader",
    "recordio": "tagmill.formats.recordio:RecordIOReader",
}


def detect_format(location: str) -> str:
    """Guess a source's format from what it is: a folder, or a file's extension/columns."""
    if storage.isdir(location):
        return "folder"
    if not storage.exists(location):
        raise SourceError(f"source not found: {location}")
    ext = posixpath.splitext(location.rstrip("/"))[1].lower()
    if ext == ".lst":
        return "lst"
    if ext in {".rec", ".idx"}:
        return "recordio"
    if ext in {".csv", ".tsv", ".txt"}:
        from tagmill.formats.onehot import looks_one_hot

        return "onehot" if looks_one_hot(location) else "csv"
    raise SourceError(
        f"cannot tell the format of {location}",
        hint="pass --format folder|csv|onehot|lst|recordio",
    )


def open_reader(location: str, options: SourceOptions | None = None, fmt: str = "auto") -> Reader:
    """The reader for ``location``; ``fmt`` forces a format instead of detecting it."""
    fmt = detect_format(location) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise SourceError(f"unknown format {fmt!r}; choose one of {', '.join(READERS)}")
    module_name, class_name = READERS[fmt].split(":")
    reader_class = getattr(importlib.import_module(module_name), class_name)
    return reader_class(location, options or SourceOptions())


__all__ = [
    "READERS",
    "FileImage",
    "ReadResult",
    "Reader",
    "RecordIOImage",
    "SourceOptions",
    "SourceRecord",
    "Skip",
    "TaskName",
    "detect_format",
    "open_reader",
]
