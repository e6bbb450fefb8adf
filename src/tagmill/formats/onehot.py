"""A one-hot CSV: an id column and one 0/1 column per class.

    Id,Genre,Action,Adventure,Animation,...
    tt0086425,"['Comedy', 'Drama']",0,0,0,...

The class columns are those named by ``--class-columns`` or, by default, every column
other than the id (and split) column whose non-empty values are all 0 or 1, so a text
column such as ``Genre`` above is left out on its own. Class order is column order.

A row with several 1s makes the file multi-label; a row of all zeros is then a valid
example with no class set. An empty cell in a class column leaves its row out
("malformed-row") rather than guessing 0.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from tagmill.errors import SourceError, TagmillError
from tagmill.formats.base import ReadResult, SourceOptions, TaskName
from tagmill.formats.csv_table import (
    LABEL_NAMES,
    CsvTable,
    ImageLocator,
    Row,
    RowIdentity,
    RowProblem,
    image_folder,
    collect_records,
    read_head,
    read_table,
    table_from_text,
)

_ZERO = frozenset({"0", "0.0"})
_ONE = frozenset({"1", "1.0"})  # pandas writes float columns as "1.0"
_BINARY = _ZERO | _ONE

#: Rows looked at by :func:`looks_one_hot`; enough to tell, cheap on a 250k-row file.
SAMPLE_ROWS = 200


def _is_binary_column(rows: Sequence[Row], index: int) -> bool:
    """True when the column's non-empty values are all 0/1 and there is at least one."""
    # Deduplicate first: 250k cells hold only a handful of distinct strings.
    values = {v.strip() for v in {row.fields[index] for row in rows}}
    values.discard("")
    return bool(values) and values <= _BINARY


def binary_columns(table: CsvTable, exclude: Sequence[int | None]) -> list[int]:
    """Indexes of the 0/1 columns of ``table``, in file order, leaving out ``exclude``."""
    skip = {i for i in exclude if i is not None}
    return [
        i for i in range(len(table.columns)) if i not in skip and _is_binary_column(table.rows, i)
    ]


_SPLIT_LIKE_NAMES = {"is_valid", "is_val", "valid", "split", "fold", "subset"}


def looks_one_hot(location: str) -> bool:
    """True when, besides the id column, 2+ columns hold only 0/1 in the first rows.

    Reads only the head of the file. Any problem reading it answers False: the plain
    CSV reader then runs and reports the problem properly.
    """
    try:
        table = table_from_text(read_head(location, SAMPLE_ROWS + 1), location)
    except (TagmillError, OSError, UnicodeDecodeError, ValueError):
        return False
    id_index = table.id_column(SourceOptions())
    # A 0/1 "label" next to fastai's 0/1 "is_valid" is a binary label with a split
    # column, not two one-hot classes: columns with such names do not count.
    not_classes = {name.lower() for name in LABEL_NAMES} | _SPLIT_LIKE_NAMES
    reserved = [id_index] + [i for i, name in enumerate(table.columns) if name.strip().lower() in not_classes]
    return len(binary_columns(table, reserved)) >= 2


def _named_class_columns(table: CsvTable, names: Sequence[str], reserved: Sequence[int | None]) -> list[int]:
    """The columns the user named, each checked to hold only 0/1 (or empty) values."""
    indexes = [table.find_column(name, "class") for name in names]
    for name, index in zip(names, indexes):
        if index in reserved:
            raise SourceError(f"{table.name}: {name!r} is the id or split column, not a class column")
        if not _is_binary_column(table.rows, index):
            _raise_bad_value(table, index)
    return list(dict.fromkeys(indexes))


def _raise_bad_value(table: CsvTable, index: int) -> None:
    column = table.columns[index]
    for row in table.rows:
        value = row.fields[index].strip()
        if value and value not in _BINARY:
            raise SourceError(
                f"{table.name}:{row.line}: class column {column!r} holds {value!r}; "
                "class columns may hold only 0 or 1",
                hint="leave that column out of --class-columns",
            )
    raise SourceError(f"{table.name}: class column {column!r} is empty")


def class_columns(table: CsvTable, options: SourceOptions, reserved: Sequence[int | None]) -> list[int]:
    if options.class_columns:
        return _named_class_columns(table, options.class_columns, reserved)
    found = binary_columns(table, reserved)
    if not found:
        raise SourceError(
            f"{table.name} has no column holding only 0/1 values; columns: "
            + ", ".join(repr(c) for c in table.columns),
            hint="for a CSV of id + label use --format csv",
        )
    return found


def check_positives(labels: tuple[str, ...], task: TaskName) -> tuple[str, ...]:
    if task == "multi":
        return labels  # all zeros: a valid example with no class set
    if not labels:
        raise RowProblem("empty-label", "no class set to 1 in a single-label one-hot CSV")
    if len(labels) > 1:
        raise RowProblem("malformed-row", f"{len(labels)} classes set to 1 in a single-label one-hot CSV")
    return labels


class OneHotCsvReader:
    """Reads a CSV of id + one 0/1 column per class."""

    def __init__(self, location: str, options: SourceOptions) -> None:
        self.location = location
        self.options = options

    def read(self) -> ReadResult:
        options = self.options
        table = read_table(self.location, options)
        id_index = table.id_column(options)
        identity = RowIdentity(table, options, id_index)
        indexes = class_columns(table, options, [id_index, identity.split_index])
        names = [table.columns[i] for i in indexes]

        label_lists, problems = _positives(table.rows, indexes, names)
        task: TaskName = options.task or ("multi" if any(len(p) != 1 for p in label_lists) else "single")

        locator = ImageLocator(image_folder(self.location, options), options.suffix)
        labelled = zip(table.rows, label_lists, problems)
        records, skipped = collect_records(table, identity, locator, labelled, lambda labels: check_positives(labels, task))

        return ReadResult(
            records=records,
            skipped=skipped,
            task=task,
            classes=names,
            description=f"one-hot CSV ({len(names)} class columns)",
        )


def _positives(
    rows: Sequence[Row], indexes: list[int], names: list[str]
) -> tuple[list[tuple[str, ...]], list[str]]:
    """Each row's classes set to 1, and a problem ("" for none) for rows with empty cells.

    A 250k x 25 table is ~6M cells, too many to test one by one in Python; but real
    data holds few distinct rows of 0/1 values, so each distinct one is decoded once.
    """
    get = operator.itemgetter(*indexes)
    single = len(indexes) == 1
    decoded: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {}
    label_lists: list[tuple[str, ...]] = []
    problems: list[str] = []
    for row in rows:
        values = (get(row.fields),) if single else get(row.fields)
        found = decoded.get(values)
        if found is None:
            found = decoded[values] = _decode(values, names)
        label_lists.append(found[0])
        problems.append(found[1])
    return label_lists, problems


def _decode(values: tuple[str, ...], names: list[str]) -> tuple[tuple[str, ...], str]:
    labels = tuple(n for n, v in zip(names, values) if v.strip() in _ONE)
    empty = [repr(n) for n, v in zip(names, values) if not v.strip()]
    return labels, f"empty value in class column(s) {', '.join(empty)}" if empty else ""
