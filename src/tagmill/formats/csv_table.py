"""What the CSV readers share: parsing the table, naming columns, finding image files.

Both :mod:`tagmill.formats.csv_labels` (id + label/tags) and
:mod:`tagmill.formats.onehot` (id + one 0/1 column per class) read a delimited text
table whose rows name an image by id. This module turns such a file into a
:class:`CsvTable` of well-formed rows (rows of the wrong width become ``Skip``\\s),
resolves the id/label/split columns the user asked for, and finds each id's image
file with one listing of the image folder, so a 250k-row CSV costs one ``list_files``
call rather than 250k ``stat``\\s (which on S3 would be 250k requests).
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from tagmill import storage
from tagmill.errors import SourceError
from tagmill.formats.base import (
    IMAGE_EXTENSIONS,
    FileImage,
    SourceRecord,
    SourceOptions,
    Skip,
    has_image_extension,
    join_inside,
)

#: Field delimiters sniffed from the header, in order of preference on a tie.
DELIMITERS = (",", "\t", ";", "|")

#: Column names taken as the id column when the user names none (case-insensitive).
ID_NAMES = ("id", "image", "image_id", "filename", "file", "path", "name", "img")

#: Column names taken as the label column when the user names none (case-insensitive).
LABEL_NAMES = ("label", "labels", "tag", "tags", "class", "category", "genre", "genres", "target", "y")

#: Extensions tried, best first, when an id names no image extension and no --suffix is given.
#: JPEG first: it is what most datasets hold, so a stem with both .jpg and .png picks .jpg.
PREFERRED_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm", ".pgm",
)

#: Words users type for delimiters on a command line, where a literal TAB is awkward.
_DELIMITER_WORDS = {
    "tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " ",
}

_SPLIT_VALUES = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
    # A boolean column (fastai's ``is_valid``) marks the validation rows.
    "1": "val", "true": "val", "yes": "val",
    "0": "train", "false": "train", "no": "train",
}


class RowProblem(Exception):
    """Why one row is left out; readers turn it into a :class:`Skip` naming the line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Row(NamedTuple):
    # A NamedTuple, not a dataclass: 250k of them are built per import, and tuples are cheap.
    line: int  #: 1-based physical line where the row starts (the header is line 1)
    fields: list[str]


@dataclass
class CsvTable:
    """A parsed CSV: its header, its well-formed rows, and the rows it had to skip."""

    location: str
    delimiter: str
    columns: list[str]  #: header names, whitespace/BOM stripped, original case
    rows: list[Row]
    skipped: list[Skip] = field(default_factory=list)

    @property
    def name(self) -> str:
        return storage.basename(self.location)

    def skip(self, line: int, reason: str, detail: str) -> Skip:
        return Skip(f"{self.name}:{line}", reason, f"line {line}: {detail}")

    def find_column(self, name: str, role: str) -> int:
        """The index of column ``name`` (case-insensitive); SourceError listing the choices."""
        wanted = normalize_name(name)
        for index, column in enumerate(self.columns):
            if normalize_name(column) == wanted:
                return index
        raise SourceError(
            f"{self.name} has no {role} column {name!r}; its columns are: "
            + ", ".join(repr(c) for c in self.columns),
            hint=f"pass --{role}-column with one of those names",
        )

    def find_default(self, names: Iterable[str], exclude: Iterable[int] = ()) -> int | None:
        """The first column whose name is in ``names`` (in column order), skipping ``exclude``."""
        wanted = set(names)
        excluded = set(exclude)
        for index, column in enumerate(self.columns):
            if index not in excluded and normalize_name(column) in wanted:
                return index
        return None

    def id_column(self, options: SourceOptions) -> int:
        """``--id-column``, else a column named like an id, else the first column."""
        if options.id_column:
            return self.find_column(options.id_column, "id")
        found = self.find_default(ID_NAMES)
        return 0 if found is None else found

    def split_column(self, options: SourceOptions, id_index: int) -> int | None:
        if not options.split_column:
            return None
        index = self.find_column(options.split_column, "split")
        if index == id_index:
            raise SourceError(f"{self.name}: the split column cannot also be the id column")
        return index


def normalize_name(name: str) -> str:
    """A column name as compared: no surrounding whitespace or BOM, lower case."""
    return name.strip().strip("\ufeff").strip().lower()


def delimiter_word(value: str) -> str:
    """A delimiter option with the words users type for awkward characters replaced
    ("tab", "\\t", "comma", "semicolon", "pipe", "space")."""
    return _DELIMITER_WORDS.get(value.strip().lower(), value) if value.strip() else value


def normalize_delimiter(value: str) -> str:
    """A ``--delimiter`` option as the one character the csv module needs."""
    char = delimiter_word(value)
    if len(char) != 1:
        raise SourceError(
            f"the field delimiter must be one character, got {value!r}",
            hint="use one of , ; | or 'tab'",
        )
    return char


def sniff_delimiter(header_line: str) -> str:
    """The candidate delimiter that splits the header into the most fields.

    Parsing the header with each candidate (rather than counting characters) ignores
    delimiters inside quoted names. A one-column header gives ",": the readers then
    refuse it for having too few columns, which is the useful message.
    """
    best, best_count = ",", 1
    for candidate in DELIMITERS:
        fields = next(csv.reader([header_line], delimiter=candidate, skipinitialspace=True), [])
        if len(fields) > best_count:
            best, best_count = candidate, len(fields)
    return best


def first_line(text: str) -> str:
    """The first non-blank line of ``text`` (the header), or "" when there is none."""
    for line in io.StringIO(text, newline=""):
        if line.strip():
            return line
    return ""


def _is_blank(fields: list[str]) -> bool:
    # Spreadsheets export trailing ",,,," rows; they carry nothing and are not errors.
    # join+strip runs in C: a per-field Python loop costs ~0.1 s on 250k rows.
    return not "".join(fields).strip()


def parse_rows(text: str, delimiter: str, location: str) -> Iterator[tuple[int, list[str] | None, str]]:
    """Yield ``(start line, fields, error)`` for each non-blank record of ``text``.

    ``fields`` is None when the record does not parse (a stray quote); ``error`` then
    says why. Strict mode makes csv report such records instead of guessing, and it
    carries on at the next line. A quote still open at the end of the file would have
    swallowed every row after it, so that stops the read with a SourceError.
    """
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True, strict=True
    )
    previous = 0
    while True:
        start = previous + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            message = str(exc)
            if "unexpected end of data" in message or "field larger" in message:
                raise SourceError(
                    f"{storage.basename(location)}:{start}: a quoted value is never closed ({message})",
                    hint="every opening double quote needs a closing one",
                ) from exc
            previous = reader.line_num
            yield start, None, message
            continue
        previous = reader.line_num
        if not _is_blank(fields):
            yield start, fields, ""


def _looks_like_data(columns: list[str]) -> bool:
    # A header cell such as "81091.jpg" means the file starts with data, not names.
    return any(has_image_extension(c.strip()) for c in columns)


def _width_hint(fields: list[str], expected: int, delimiter: str) -> str:
    others = [d for d in DELIMITERS if d != delimiter]
    if len(fields) == 1 and any(d in fields[0] for d in others):
        return " (mixed delimiters?)"
    if len(fields) > expected:
        return f" (an unquoted {delimiter!r} inside a value?)"
    return ""


def table_from_text(text: str, location: str, delimiter: str | None = None) -> CsvTable:
    """Parse ``text`` into a :class:`CsvTable`; rows of the wrong width become skips."""
    name = storage.basename(location)
    header_line = first_line(text)
    if not header_line:
        raise SourceError(f"{name} is empty; expected a header row such as 'id,label'")
    delim = normalize_delimiter(delimiter) if delimiter else sniff_delimiter(header_line)
    records = parse_rows(text, delim, location)
    header = next(records, None)
    if header is None or header[1] is None:
        raise SourceError(f"{name}: cannot parse the header row ({header[2] if header else 'empty'})")
    columns = [c.strip().strip("\ufeff").strip() for c in header[1]]
    if _looks_like_data(columns):
        raise SourceError(
            f"{name}: the first line looks like data, not column names: {header_line.strip()!r}",
            hint="add a header line naming the columns, e.g. 'id,label'",
        )
    table = CsvTable(location, delim, columns, [])
    expected = len(columns)
    for line, fields, error in records:
        if fields is None:
            table.skipped.append(table.skip(line, "malformed-row", f"cannot parse: {error}"))
        elif len(fields) != expected:
            detail = f"expected {expected} fields, found {len(fields)}" + _width_hint(fields, expected, delim)
            table.skipped.append(table.skip(line, "malformed-row", detail))
        else:
            table.rows.append(Row(line, fields))
    if not table.rows and not table.skipped:
        raise SourceError(f"{name} has a header but no data rows")
    if not table.rows:
        # Every row wrong is a wrong delimiter or a broken export, not a few bad rows.
        raise SourceError(
            f"{name}: none of its {len(table.skipped)} rows can be read; first: {table.skipped[0].detail}",
            hint="pass --delimiter if the file uses a separator other than the header's",
        )
    return table


def read_table(location: str, options: SourceOptions) -> CsvTable:
    """Read and parse the CSV at ``location`` (a BOM is dropped by utf-8-sig)."""
    return table_from_text(storage.read_text(location), location, options.delimiter)


def read_head(location: str, max_lines: int) -> str:
    """The first ``max_lines`` lines of a text file, without reading the rest (it may be
    a large object on S3). Raises StorageError/UnicodeDecodeError/OSError on failure."""
    lines: list[str] = []
    with storage.open_read(location) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        for line in text:
            lines.append(line)
            if len(lines) >= max_lines:
                break
    return "".join(lines)


def parse_split(value: str) -> str:
    """A split cell as "train"/"val"/"test"; RowProblem for anything else."""
    split = _SPLIT_VALUES.get(value.strip().lower())
    if split is None:
        raise RowProblem(
            "malformed-row",
            f"split value {value!r} is not one of train/val/test (or 1/true/yes for val, 0/false/no for train)",
        )
    return split


def parent_folder(location: str) -> str:
    """The folder holding ``location`` (a local path or URL)."""
    if "://" in location:
        return posixpath.dirname(location.rstrip("/"))
    return os.path.dirname(location) or "."


class ImageLocator:
    """Finds the image file named by each id, from a single listing of the folder."""

    def __init__(self, folder: str, suffix: str | None) -> None:
        if not storage.isdir(folder):
            raise SourceError(
                f"image folder not found: {folder}",
                hint="pass --images with the folder that holds the image files",
            )
        self.folder = folder
        self.prefix = storage.join(folder, "")  # folder + separator
        self.suffix = suffix
        self.files = set(storage.list_files(folder))
        # Only needed when the extension must be guessed: "img/81091" -> "img/81091.jpg".
        self.by_stem = self._index_stems(self.files) if suffix is None else {}

    @staticmethod
    def _index_stems(files: Iterable[str]) -> dict[str, str]:
        rank = {ext: i for i, ext in enumerate(PREFERRED_EXTENSIONS)}
        best: dict[str, int] = {}
        found: dict[str, str] = {}
        for path in files:
            dot = path.rfind(".")
            if dot <= path.rfind("/") + 1:  # no extension (or a dotfile such as ".jpg")
                continue
            ext = path[dot:].lower()
            if ext not in IMAGE_EXTENSIONS:
                continue
            position = rank.get(ext, len(rank))  # an image type added to base ranks last
            stem = path[:dot]
            if position < best.get(stem, len(rank) + 1):
                best[stem] = position
                found[stem] = path
        return found

    def _location(self, relative: str) -> str:
        if "/" not in relative:
            return self.prefix + relative  # same as storage.join, without its cost per row
        return storage.join(self.folder, *relative.split("/"))

    def _relative(self, name: str) -> str:
        """``name`` as a '/'-path inside the folder; RowProblem when it would escape it."""
        # Fast path for the usual flat id ("81091.jpg"): nothing there can climb out.
        if "/" not in name and "\\" not in name and name not in {"", ".", ".."} and name[1:2] != ":":
            return name
        if join_inside(self.folder, name) is None:
            raise RowProblem("unsafe-path", f"id {name!r} points outside the image folder {self.folder}")
        return posixpath.normpath(name.replace("\\", "/").strip())

    def locate(self, image_id: str) -> str:
        """The image location for ``image_id``; RowProblem "unsafe-path" or "missing"."""
        relative = self._relative(image_id + (self.suffix or ""))
        if relative in self.files:
            return self._location(relative)
        if self.suffix is None:
            return self._guess(relative)
        # Ids that already carry the suffix ("a.jpg" with --suffix .jpg) name the file as is.
        if image_id.lower().endswith(self.suffix.lower()):
            bare = self._relative(image_id)
            if bare in self.files:
                return self._location(bare)
        raise RowProblem("missing", f"no image file {self._location(relative)}")

    def _guess(self, relative: str) -> str:
        found = self.by_stem.get(relative)
        if found is not None:
            return self._location(found)
        if not has_image_extension(relative):
            raise RowProblem(
                "missing",
                f"no image file {self._location(relative)}.* (tried {', '.join(PREFERRED_EXTENSIONS[:4])}, ...;"
                " pass --suffix if the files use another one)",
            )
        raise RowProblem("missing", f"no image file {self._location(relative)}")


class RowIdentity:
    """The per-row checks both readers share: id present and unique, split valid."""

    def __init__(self, table: CsvTable, options: SourceOptions, id_index: int) -> None:
        self.table = table
        self.id_index = id_index
        self.split_index = table.split_column(options, id_index)
        self.first_line: dict[str, int] = {}

    def identify(self, row: Row) -> tuple[str, str | None]:
        """``(id, split)`` of ``row``; RowProblem when the id is empty/duplicate or the split bad."""
        image_id = row.fields[self.id_index].strip()
        if not image_id:
            raise RowProblem("malformed-row", f"empty id in column {self.table.columns[self.id_index]!r}")
        first = self.first_line.setdefault(image_id, row.line)
        if first != row.line:
            raise RowProblem("duplicate-id", f"id {image_id!r} already on line {first}; keeping that one")
        split = None if self.split_index is None else parse_split(row.fields[self.split_index])
        return image_id, split


def image_folder(location: str, options: SourceOptions) -> str:
    """``--images`` when given, else the folder the CSV is in."""
    return options.images or parent_folder(location)


def in_file_order(skips: list[Skip]) -> list[Skip]:
    """``skips`` sorted by line: they come from two passes (width check, then row checks)."""
    return sorted(skips, key=lambda s: int(s.source.rsplit(":", 1)[1]))


def collect_records(
    table: CsvTable,
    identity: RowIdentity,
    locator: ImageLocator,
    labelled: Iterable[tuple[Row, tuple[str, ...], str]],
    check: Callable[[tuple[str, ...]], tuple[str, ...]],
) -> tuple[list[SourceRecord], list[Skip]]:
    """One record per usable row; every :class:`RowProblem` becomes a Skip naming its line.

    ``labelled`` yields (row, labels, problem) where ``problem`` is "" for a row whose
    labels parsed; ``check`` enforces what the task allows (e.g. one label when single).
    """
    records: list[SourceRecord] = []
    skipped = list(table.skipped)
    for row, labels, problem in labelled:
        try:
            image_id, row_split = identity.identify(row)
            if problem:
                raise RowProblem("malformed-row", problem)
            checked = check(labels)
            image = FileImage(locator.locate(image_id))
        except RowProblem as exc:
            skipped.append(table.skip(row.line, exc.reason, exc.detail))
            continue
        records.append(SourceRecord(image_id, checked, image, row_split))
    return records, in_file_order(skipped)
