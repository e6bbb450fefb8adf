"""A CSV (or TSV) of image id + label, or image id + delimited tags.

    id,shot_image_id,tags
    2,81091,"bed, legs, text"

Single-label files hold one class per row; multi-label files hold several tags in one
cell, separated by ``--tag-sep`` or, when that is not given, by the first of
``,`` ``|`` ``;`` that appears in any label cell (whitespace only with ``--multi-label``,
because a single-label class may well contain a space). A cell written as a Python/JSON
list (``['Drama', 'Romance']``) is read as its items.

The task is ``--multi-label``/``--single-label`` when given, else "multi" when any row
holds two or more tags, else "single". In a multi-label file an empty cell is a valid
all-negative example; in a single-label file it is skipped as "empty-label".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tagmill.errors import SourceError
from tagmill.formats.base import ReadResult, SourceOptions, TaskName
from tagmill.formats.csv_table import (
    LABEL_NAMES,
    CsvTable,
    ImageLocator,
    RowIdentity,
    RowProblem,
    delimiter_word,
    image_folder,
    collect_records,
    read_table,
)

Splitter = Callable[[str], tuple[str, ...]]

#: Tag separators tried, in order, when the user names none.
_TAG_SEPARATORS = (",", "|", ";")
_SEVERAL_WORDS = re.compile(r"\S\s+\S")


def _unwrap_list(cell: str) -> tuple[str, bool]:
    """``"['a', 'b']"`` -> ``("'a', 'b'", True)``; any other cell unchanged."""
    text = cell.strip()
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        return text[1:-1], True
    return text, False


def _clean(parts: Sequence[str], quoted: bool) -> tuple[str, ...]:
    tags = (p.strip().strip("'\"").strip() if quoted else p.strip() for p in parts)
    # dict.fromkeys: drop duplicates but keep the order the user wrote them in.
    return tuple(dict.fromkeys(t for t in tags if t))


def make_splitter(separator: str | None) -> Splitter:
    """A function splitting one label cell into its tags (None: the cell is one label)."""

    def split(cell: str) -> tuple[str, ...]:
        text, quoted = _unwrap_list(cell)
        if separator is None:
            parts: Sequence[str] = [text]
        elif separator.isspace():
            parts = text.split()
        else:
            parts = text.split(separator)
        return _clean(parts, quoted)

    return split


def detect_separator(cells: Sequence[str], task: TaskName | None) -> str | None:
    """The tag separator the label cells use, or None when each cell is one label."""
    if task == "single":
        # The user said one label per row: "Washington, D.C." is then one class.
        return None
    texts = [_unwrap_list(c)[0] for c in cells]
    for separator in _TAG_SEPARATORS:
        if any(separator in t for t in texts):
            return separator
    if task == "multi" and any(_SEVERAL_WORDS.search(t) for t in texts):
        return " "
    return None


def tag_separator(options: SourceOptions, cells: Sequence[str]) -> str | None:
    if options.tag_separator:
        # Any string splits tags (" | " is fine); only the field delimiter must be one character.
        return delimiter_word(options.tag_separator)
    return detect_separator(cells, options.task)


def label_column(table: CsvTable, options: SourceOptions, id_index: int) -> int:
    """``--label-column``, else a column named like a label, else the first non-id column."""
    if len(table.columns) < 2:
        raise SourceError(
            f"{table.name} has only one column ({table.columns[0]!r}); expected an id and a label column",
            hint="pass --delimiter if the file uses a separator other than , TAB ; |",
        )
    if options.label_column:
        index = table.find_column(options.label_column, "label")
        if index == id_index:
            raise SourceError(f"{table.name}: the label column cannot also be the id column")
        return index
    found = table.find_default(LABEL_NAMES, exclude=[id_index])
    if found is not None:
        return found
    return next(i for i in range(len(table.columns)) if i != id_index)


def check_labels(tags: tuple[str, ...], task: TaskName) -> tuple[str, ...]:
    if task == "multi":
        return tags  # an empty cell is a valid example with no tag set
    if not tags:
        raise RowProblem("empty-label", "empty label in a single-label CSV")
    if len(tags) > 1:
        raise RowProblem("malformed-row", f"{len(tags)} labels ({', '.join(tags)}) in a single-label CSV")
    return tags


class CsvReader:
    """Reads a CSV/TSV of id + label, or id + delimited tags."""

    def __init__(self, location: str, options: SourceOptions) -> None:
        self.location = location
        self.options = options

    def read(self) -> ReadResult:
        options = self.options
        table = read_table(self.location, options)
        id_index = table.id_column(options)
        label_index = label_column(table, options, id_index)
        identity = RowIdentity(table, options, id_index)
        if identity.split_index == label_index:
            raise SourceError(f"{table.name}: the split column cannot also be the label column")

        cells = [row.fields[label_index] for row in table.rows]
        separator = tag_separator(options, cells)
        split = make_splitter(separator)
        tag_lists = [split(c) for c in cells]
        task: TaskName = options.task or ("multi" if any(len(t) > 1 for t in tag_lists) else "single")

        locator = ImageLocator(image_folder(self.location, options), options.suffix)
        labelled = ((row, tags, "") for row, tags in zip(table.rows, tag_lists))
        records, skipped = collect_records(table, identity, locator, labelled, lambda tags: check_labels(tags, task))

        classes = sorted({label for record in records for label in record.labels})
        kind = "delimited tags" if task == "multi" else "labels"
        return ReadResult(
            records=records,
            skipped=skipped,
            task=task,
            classes=classes,
            description=f"CSV of {kind} ({len(classes)} classes)",
        )
