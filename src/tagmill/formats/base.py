"""What every reader of user data produces: records of (id, labels, where the image is).

Readers only list and label; they never decode images. Decoding happens later, in
parallel, in :mod:`tagmill.dataset.importer`. Everything here is picklable so records
can travel to worker processes.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tagmill import storage

#: single-label or multi-label: the one definition (``objective.py`` says what each means)
TaskName = Literal["single", "multi"]

#: File extensions treated as images when listing folders.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
)


@dataclass(frozen=True)
class FileImage:
    """An image stored as its own file (local path or URL)."""

    location: str

    def read(self) -> bytes:
        return storage.read_bytes(self.location)

    def describe(self) -> str:
        return self.location


@dataclass(frozen=True)
class RecordIOImage:
    """An image stored inside an MXNet RecordIO pack, at a byte offset."""

    rec_location: str
    offset: int

    def read(self) -> bytes:
        # Imported here: the RecordIO reader is only needed for .rec sources.
        from tagmill.formats.recordio import read_image_at

        return read_image_at(self.rec_location, self.offset)

    def describe(self) -> str:
        return f"{self.rec_location}@{self.offset}"


ImageRef = FileImage | RecordIOImage


@dataclass(frozen=True)
class SourceRecord:
    """One labelled image as the user's data describes it."""

    id: str  #: the user's identifier (CSV id, relative path, .lst index...)
    labels: tuple[str, ...]  #: class names; one for single-label, any number for multi-label
    image: ImageRef
    split: str | None = None  #: an explicit split ("train", "val", "test") when the source names one


@dataclass(frozen=True)
class Skip:
    """An input left out of the dataset, and why."""

    source: str  #: file, URL or "file.csv:17" that was skipped
    reason: str  #: short category: "missing", "unreadable", "not-an-image", "malformed-row", ...
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class ReadResult:
    """Everything a reader learned about a source."""

    records: list[SourceRecord]
    skipped: list[Skip] = field(default_factory=list)
    #: the task the source implies, or None when it cannot tell (the importer decides)
    task: TaskName | None = None
    #: class names in the order the source defines them (folder names, one-hot columns,
    #: class index order); None means "sort the labels found"
    classes: list[str] | None = None
    #: a few words for the summary: "folder per class", "one-hot CSV (25 classes)"...
    description: str = ""


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source. Each reader uses the fields that apply to its format."""

    #: folder holding the images named by a CSV/.lst (default: the list file's folder)
    images: str | None = None
    #: suffix appended to CSV ids to name image files (".jpg"); None tries common ones
    suffix: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    #: one-hot CSV: the 0/1 columns that are classes (None: every 0/1 column)
    class_columns: tuple[str, ...] | None = None
    #: CSV field delimiter (None: sniffed from the header among , TAB ; |)
    delimiter: str | None = None
    #: separator between tags inside one CSV cell (None: "," or " " or "|", detected)
    tag_separator: str | None = None
    #: CSV column that names each row's split ("train"/"val"/"test", or 1/0 for val)
    split_column: str | None = None
    #: folder per class: which folder level names the class (1 = first below root, -1 = parent)
    class_level: int = 1
    #: .lst/.rec: class names by index (None: from the paths' folders, else "0", "1", ...)
    class_names: tuple[str, ...] | None = None
    #: .lst/.rec with several label columns: "index" (class ids) or "onehot" (0/1 per class)
    label_format: Literal["auto", "index", "onehot"] = "auto"
    #: force the task instead of inferring it
    task: TaskName | None = None


class Reader(Protocol):
    """A source format. ``read`` lists the records; it does not decode any image."""

    def read(self) -> ReadResult: ...


def join_inside(root: str, relative: str) -> str | None:
    """``root`` joined with ``relative``, or None when ``relative`` would escape ``root``.

    Refuses absolute paths, drive letters and any ``..`` that climbs above the root,
    so a crafted list file cannot make the importer read ``/etc/passwd``.
    """
    rel = relative.replace("\\", "/").strip()
    if not rel or rel.startswith("/") or "://" in rel or (len(rel) > 1 and rel[1] == ":"):
        return None
    normal = posixpath.normpath(rel)
    if normal == ".." or normal.startswith("../") or normal == ".":
        return None
    return storage.join(root, *normal.split("/"))


def has_image_extension(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


#: file extensions by PIL format name; any other format PIL reads is named after itself
_EXTENSION_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
                        "PPM": ".ppm"}
#: the leading bytes of the formats nearly every request is in: known without Pillow's
#: header parse (~0.1 ms a photo, paid per captured image)
_SIGNATURES = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"))


def image_extension(data: bytes) -> str:
    """The file extension (with its dot) for an image's bytes, from its header; ".img"
    when Pillow cannot tell (the name is all that is wanted: the bytes were read already)."""
    for signature, extension in _SIGNATURES:
        if data.startswith(signature):
            return extension
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format or ""
    except Exception:  # noqa: BLE001 - any unreadable header: a neutral name
        kind = ""
    return _EXTENSION_OF_FORMAT.get(kind, f".{kind.lower()}" if kind.isalnum() else ".img")

