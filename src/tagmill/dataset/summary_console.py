"""A :class:`~tagmill.dataset.summary.DatasetSummary` on one screen (``tagmill inspect``):
header, class table, imbalance, co-occurrence, what the import skipped.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tagmill.dataset.summary import NO_TAGS, DatasetSummary

#: Classes shown in the summary table; the rest are counted, not listed.
MAX_TABLE_CLASSES = 40


def render_summary(summary: DatasetSummary, console: Console) -> None:
    """Print ``summary`` compactly: header, class table, imbalance, co-occurrence, report."""
    console.print(_header(summary))
    console.print(_class_table(summary))
    hidden = len(summary.classes) - len(_table_classes(summary)[0])
    if hidden:
        # a line of its own: as a table row it would widen the name column for every class
        noun = "tag" if summary.task == "multi" else "class"
        console.print(Text(f"… and {_plural(hidden, noun)} with fewer images, not shown", style="dim"))
    console.print(_imbalance_line(summary))
    if summary.task == "multi":
        console.print(_cooccurrence_table(summary))
    console.print(_skipped_line(summary))
    console.print(Text(f"images: {describe_resize(summary.image)}"))
    console.print(Text(f"source: {describe_source(summary.source)}"))


def _header(summary: DatasetSummary) -> Text:
    task = "multi-label" if summary.task == "multi" else "single-label" if summary.task == "single" else summary.task
    noun = "tag" if summary.task == "multi" else "class"
    per_split = ", ".join(f"{name} {count:,}" for name, count in summary.split_counts.items())
    text = Text()
    text.append(summary.dataset, style="bold")
    text.append(f": {task}, {_plural(len(summary.classes), noun)}, {summary.total_images:,} images ({per_split})")
    return text


def _class_table(summary: DatasetSummary) -> Table:
    noun = "tag" if summary.task == "multi" else "class"
    splits = list(summary.split_counts)
    shown, _ = _table_classes(summary)
    # SIMPLE: rules under the header and above the totals, nothing else (stays compact)
    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, show_footer=True, header_style="bold", footer_style="bold")
    table.add_column(noun, footer="images", no_wrap=True, overflow="ellipsis", max_width=40)
    for name in splits:
        table.add_column(name, justify="right", footer=f"{summary.split_counts[name]:,}")
    table.add_column("total", justify="right", footer=f"{summary.total_images:,}")
    for cls in shown:
        cells = [_count_cell(summary.class_counts[s].get(cls, 0), train=s == "train") for s in splits]
        table.add_row(Text(cls), *cells, f"{summary.class_total(cls):,}")
    if summary.task == "multi":
        untagged = [f"{summary.untagged.get(s, 0):,}" for s in splits]
        table.add_row(Text(NO_TAGS, style="italic"), *untagged, f"{sum(summary.untagged.values()):,}")
    return table


def _table_classes(summary: DatasetSummary) -> tuple[list[str], int]:
    """Manifest order when everything fits; otherwise the most frequent, most first."""
    if len(summary.classes) <= MAX_TABLE_CLASSES:
        return summary.classes, 0
    by_size = sorted(summary.classes, key=lambda c: -summary.class_total(c))  # stable: ties keep manifest order
    return by_size[:MAX_TABLE_CLASSES], len(summary.classes) - MAX_TABLE_CLASSES


def _count_cell(count: int, *, train: bool) -> Text:
    # an empty class is worth seeing: nothing to learn from (train) or to measure (val/test)
    style = ("bold red" if train else "yellow") if count == 0 else ""
    return Text(f"{count:,}", style=style)


def _imbalance_line(summary: DatasetSummary) -> Text:
    if summary.imbalance is None or summary.largest_class is None or summary.smallest_class is None:
        return Text("imbalance: n/a (no training split)", style="dim")
    (big, big_n), (small, small_n) = summary.largest_class, summary.smallest_class
    kind = "tag positives" if summary.task == "multi" else "class"
    if math.isinf(summary.imbalance):
        return Text(f"imbalance: ∞ — {small!r} has no training images (largest: {big!r}, {big_n:,})", style="red")
    if big_n == small_n:
        return Text(f"imbalance: none ({big_n:,} training images per {'tag' if summary.task == 'multi' else 'class'})")
    style = "yellow" if summary.imbalance >= 10 else ""
    return Text(
        f"imbalance: {summary.imbalance:.1f}× (largest / smallest training {kind}: "
        f"{big!r} {big_n:,} / {small!r} {small_n:,})",
        style=style,
    )


def _cooccurrence_table(summary: DatasetSummary) -> Table | Text:
    if not summary.cooccurrence:
        return Text("co-occurrence: no two tags appear together in a training image", style="dim")
    table = Table(title="tags that appear together (train)", title_justify="left", box=None, pad_edge=False)
    table.add_column("tag", no_wrap=True, overflow="ellipsis", max_width=30)
    table.add_column("tag", no_wrap=True, overflow="ellipsis", max_width=30)
    table.add_column("images", justify="right")
    for a, b, count in summary.cooccurrence:
        table.add_row(Text(a), Text(b), f"{count:,}")
    return table


def _skipped_line(summary: DatasetSummary) -> Text:
    if summary.inputs is None:
        return Text("import report: none in dataset.json", style="dim")
    line = f"skipped {summary.skipped_count:,} of {summary.inputs:,} inputs"
    if summary.skipped_count == 0:
        return Text(line)
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in summary.skipped_by_reason.items())
    return Text(f"{line}: {reasons} — see dataset.json report" if reasons else f"{line} — see dataset.json report", style="yellow")


def describe_resize(image: dict[str, Any]) -> str:
    max_side = image.get("max_side")
    if max_side:
        return f"shorter side shrunk to at most {max_side} px at import"
    if "max_side" in image:
        return "kept at their original size"
    return "resize policy not recorded"


def describe_source(source: dict[str, Any]) -> str:
    location = source.get("location", "unknown")
    text = f"{location} ({source['format']})" if source.get("format") else str(location)
    extras = [
        f"{key}={value}"
        for key, value in source.items()
        if key not in {"location", "format", "split"} and value not in (None, "", [], {})
    ]
    split = source.get("split")
    if split:
        held = f"val {split['val_fraction']:.0%}" + (f", test {split['test_fraction']:.0%}" if split.get("test_fraction") else "")
        extras.append(f"split {held}, seed {split['seed']}")
    return f"{text}; {', '.join(extras)}" if extras else text


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


__all__ = ["describe_resize", "describe_source", "render_summary"]
