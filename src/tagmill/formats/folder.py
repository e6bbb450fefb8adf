"""Folder per class: ``root/<class>/<image>`` (Caltech-256, ImageNet-style layouts).

Nested sub-folders are allowed; the class is the first folder level below the root
unless ``class_level`` says otherwise (``-1``: the folder that holds the image). When
every first-level folder is a split name (``train/``, ``val/``, ``test/``), those
folders give the split and the class comes from the level below.
"""

from __future__ import annotations

from tagmill import storage
from tagmill.errors import SourceError
from tagmill.formats.base import (
    FileImage,
    ReadResult,
    SourceOptions,
    SourceRecord,
    Skip,
    has_image_extension,
)

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class FolderReader:
    def __init__(self, location: str, options: SourceOptions) -> None:
        self.root = location
        self.options = options

    def read(self) -> ReadResult:
        if not storage.isdir(self.root):
            raise SourceError(f"not a folder: {self.root}")
        files = [f for f in storage.list_files(self.root) if not _hidden(f)]
        split_layout = _is_split_layout(files)
        records: list[SourceRecord] = []
        skipped: list[Skip] = []
        for relative in files:
            location = storage.join(self.root, *relative.split("/"))
            parts = relative.split("/")
            split = SPLIT_FOLDERS[parts[0]] if split_layout else None
            folders = parts[1:-1] if split_layout else parts[:-1]
            label = self._class_of(folders)
            if label is None:
                skipped.append(Skip(location, "no-class", "file is not inside a class folder"))
            elif not has_image_extension(relative):
                skipped.append(Skip(location, "not-an-image", "file extension is not an image type"))
            else:
                records.append(SourceRecord(relative, (label,), FileImage(location), split))
        classes = sorted({r.labels[0] for r in records})
        layout = "train/val folders of class folders" if split_layout else "folder per class"
        return ReadResult(records, skipped, "single", classes, f"{layout} ({len(classes)} classes)")

    def _class_of(self, folders: list[str]) -> str | None:
        level = self.options.class_level
        if not folders:
            return None
        if level == -1:
            return folders[-1]
        if level < 1 or level > len(folders):
            return None
        return folders[level - 1]


def _hidden(relative: str) -> bool:
    """Dot-files and dot-folders (.DS_Store, .ipynb_checkpoints) are never data."""
    return any(part.startswith(".") for part in relative.split("/"))


def _is_split_layout(files: list[str]) -> bool:
    tops = {f.split("/")[0] for f in files if "/" in f}
    return bool(tops) and tops <= SPLIT_FOLDERS.keys() and all(f.count("/") >= 2 for f in files)
