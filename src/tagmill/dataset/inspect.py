"""``tagmill inspect``: what is in a packed dataset, in numbers and in pictures.

:func:`summarize` reads the manifest (and, for multi-label data, streams the training
shards' label files to count which tags appear together); :func:`render_summary` prints
that on one screen; :func:`contact_sheet` draws a seeded random grid of samples with
their labels, streaming the shards so a dataset of any size costs a few tiles of memory.
"""

from __future__ import annotations

import io
import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tagmill import storage
from tagmill.dataset.images import decode, to_rgb
from tagmill.dataset.manifest import SPLITS, Manifest, load_manifest, shard_locations
from tagmill.dataset.shards import Sample, iter_shard
from tagmill.errors import DatasetError, InputError, UnreadableImageError

#: Classes shown in the summary table; the rest are counted, not listed.
MAX_TABLE_CLASSES = 40
DEFAULT_TOP_PAIRS = 10
#: A contact sheet is for eyeballing: more tiles than this is a mistake, not a request.
MAX_TILES = 400
MIN_TILE, MAX_TILE = 48, 1024

TILE_BACKGROUND = (222, 222, 222)  # neutral grey: letterbox bars read as "not image"
CAPTION_BACKGROUND = (255, 255, 255)
CAPTION_COLOUR = (20, 20, 20)
NO_TAGS_COLOUR = (120, 120, 120)  # an untagged image is data, but not a label: shown greyed
GRID_COLOUR = (180, 180, 180)
ELLIPSIS = "…"
NO_TAGS = "(no tags)"


# --------------------------------------------------------------------------- summary


@dataclass
class DatasetSummary:
    dataset: str
    task: str  #: "single" or "multi"
    classes: list[str]
    #: images per split, splits in train/val/test order
    split_counts: dict[str, int]
    #: split -> class -> images (single-label) or tag positives (multi-label)
    class_counts: dict[str, dict[str, int]]
    #: multi-label images without any tag, per split (all zero for single-label)
    untagged: dict[str, int]
    #: largest / smallest training class count; inf when a class has no training image;
    #: None when there is no training split or no class
    imbalance: float | None
    largest_class: tuple[str, int] | None
    smallest_class: tuple[str, int] | None
    #: (tag, tag, training images with both), most frequent first (multi-label only)
    cooccurrence: list[tuple[str, str, int]] = field(default_factory=list)
    inputs: int | None = None  #: inputs the import looked at (None: no import report)
    skipped_count: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    image: dict[str, Any] = field(default_factory=dict)  #: resize policy (manifest.image)
    source: dict[str, Any] = field(default_factory=dict)  #: manifest.source

    @property
    def total_images(self) -> int:
        return sum(self.split_counts.values())

    def class_total(self, name: str) -> int:
        return sum(counts.get(name, 0) for counts in self.class_counts.values())


def summarize(dataset: str, *, top_pairs: int = DEFAULT_TOP_PAIRS) -> DatasetSummary:
    """Everything ``tagmill inspect`` prints about ``dataset``.

    Counts come from the manifest; only tag co-occurrence (multi-label) reads the
    training shards, one sample at a time.
    """
    manifest = load_manifest(dataset)
    splits = _ordered_splits(manifest)
    train_counts = manifest.splits["train"].class_counts if "train" in manifest.splits else None
    imbalance, largest, smallest = _imbalance(manifest.classes, train_counts)
    pairs: list[tuple[str, str, int]] = []
    if manifest.task == "multi" and "train" in manifest.splits and top_pairs > 0:
        pairs = cooccurrence(_iter_labels(dataset, manifest, "train"), manifest.classes, top_pairs)
    report = manifest.report
    return DatasetSummary(
        dataset=dataset,
        task=manifest.task,
        classes=list(manifest.classes),
        split_counts={name: manifest.splits[name].count for name in splits},
        class_counts={
            name: {c: manifest.splits[name].class_counts.get(c, 0) for c in manifest.classes} for name in splits
        },
        untagged={name: manifest.splits[name].untagged for name in splits},
        imbalance=imbalance,
        largest_class=largest,
        smallest_class=smallest,
        cooccurrence=pairs,
        inputs=int(report["inputs"]) if "inputs" in report else None,
        skipped_count=int(report.get("skipped_count", 0)),
        skipped_by_reason={str(k): int(v) for k, v in report.get("skipped_by_reason", {}).items()},
        image=dict(manifest.image),
        source=dict(manifest.source),
    )


def _ordered_splits(manifest: Manifest) -> list[str]:
    """train, val, test first (the order people read them in), then anything else."""
    known = [name for name in SPLITS if name in manifest.splits]
    return known + sorted(name for name in manifest.splits if name not in SPLITS)


def _imbalance(
    classes: list[str], train_counts: dict[str, int] | None
) -> tuple[float | None, tuple[str, int] | None, tuple[str, int] | None]:
    if not classes or train_counts is None:
        return None, None, None
    counts = [(name, train_counts.get(name, 0)) for name in classes]
    # ties: the first class in manifest order, so the report is stable
    largest = max(counts, key=lambda item: item[1])
    smallest = min(counts, key=lambda item: item[1])
    ratio = math.inf if smallest[1] == 0 else largest[1] / smallest[1]
    return ratio, largest, smallest


def _iter_labels(dataset: str, manifest: Manifest, split: str) -> Iterator[list[str]]:
    for location in shard_locations(dataset, manifest, split):
        for sample in iter_shard(location):
            yield list(sample.meta.get("labels", []))  # the image bytes are dropped right here


def cooccurrence(labels: Iterable[list[str]], classes: list[str], top: int = DEFAULT_TOP_PAIRS) -> list[tuple[str, str, int]]:
    """The ``top`` pairs of tags that appear together most often, with their counts.

    Each pair is written in manifest class order; ties are broken by that order too, so
    the same dataset always gives the same list.
    """
    rank = {name: index for index, name in enumerate(classes)}

    def order(tag: str) -> tuple[int, str]:
        return (rank.get(tag, len(rank)), tag)  # unknown tags (should not happen) sort last

    counts: Counter[tuple[str, str]] = Counter()
    for tags in labels:
        counts.update(itertools.combinations(sorted(set(tags), key=order), 2))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], order(item[0][0]), order(item[0][1])))
    return [(a, b, n) for (a, b), n in ranked[:top]]


# --------------------------------------------------------------------------- rendering


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


# --------------------------------------------------------------------------- contact sheet

_GRID = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")


def parse_grid(text: str) -> tuple[int, int]:
    """``"4x3"`` -> ``(4, 3)``: columns x rows."""
    match = _GRID.fullmatch(text)
    if match is None:
        raise InputError(f"bad grid {text!r}: expected COLSxROWS, e.g. 4x3")
    grid = (int(match.group(1)), int(match.group(2)))
    _check_grid(grid)
    return grid


def _check_grid(grid: tuple[int, int]) -> None:
    cols, rows = grid
    if cols < 1 or rows < 1:
        raise InputError(f"bad grid {cols}x{rows}: columns and rows must be at least 1")
    if cols * rows > MAX_TILES:
        raise InputError(f"grid {cols}x{rows} asks for {cols * rows} tiles; at most {MAX_TILES} fit a contact sheet")


def _check_tile(tile: int) -> None:
    if not MIN_TILE <= tile <= MAX_TILE:
        raise InputError(f"tile size {tile} px is out of range ({MIN_TILE}..{MAX_TILE})")


def font_size(tile: int) -> int:
    # ~9% of the tile: 14 px at 160, big enough to read, small enough for a few tags
    return max(11, round(tile * 0.09))


def caption_height(tile: int) -> int:
    """Pixel height of the caption strip under each tile."""
    return round(font_size(tile) * 1.8)


def sheet_size(grid: tuple[int, int], tile: int, tiles: int | None = None) -> tuple[int, int]:
    """(width, height) of a sheet; with ``tiles`` < cols*rows, only the rows in use."""
    cols, rows = grid
    if tiles is not None:
        rows = min(rows, max(1, math.ceil(tiles / cols)))
    return cols * tile, rows * (tile + caption_height(tile))


def contact_sheet(
    dataset: str,
    out: str,
    grid: tuple[int, int] = (4, 3),
    split: str = "train",
    seed: int = 0,
    tile: int = 160,
) -> int:
    """Draw ``cols x rows`` random samples of ``split`` with their labels into a PNG.

    Samples are picked by seeded reservoir sampling while the shards stream past, so
    only the chosen few images are ever held. Tiles run in dataset order, row by row;
    a split with fewer samples than tiles gives a sheet of just the rows it fills.
    Returns the number of tiles drawn.
    """
    _check_grid(grid)
    _check_tile(tile)
    manifest = load_manifest(dataset)
    locations = shard_locations(dataset, manifest, split)  # DatasetError for a missing split
    samples = reservoir(_iter_samples(locations), grid[0] * grid[1], seed)
    if not samples:
        raise DatasetError(f"the {split} split of {dataset} has no images to draw")
    sheet = _draw_sheet(samples, grid, tile, manifest.task)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=False)
    storage.write_bytes(out, buffer.getvalue())
    return len(samples)


def _iter_samples(locations: list[str]) -> Iterator[Sample]:
    for location in locations:
        yield from iter_shard(location)


def reservoir(items: Iterable[Sample], k: int, seed: int) -> list[Sample]:
    """A uniform random ``k`` of ``items`` in one pass (Algorithm R), in stream order."""
    rng = random.Random(seed)
    kept: list[tuple[int, Sample]] = []
    for index, item in enumerate(items):
        if index < k:
            kept.append((index, item))
            continue
        slot = rng.randrange(index + 1)
        if slot < k:
            kept[slot] = (index, item)  # the replaced sample's bytes are freed here
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


def _draw_sheet(samples: list[Sample], grid: tuple[int, int], tile: int, task: str) -> Image.Image:
    cols = grid[0]
    sheet = Image.new("RGB", sheet_size(grid, tile, len(samples)), CAPTION_BACKGROUND)
    font = ImageFont.load_default(size=font_size(tile))
    draw = ImageDraw.Draw(sheet)
    cell_height = tile + caption_height(tile)
    for index, sample in enumerate(samples):
        x, y = (index % cols) * tile, (index // cols) * cell_height
        sheet.paste(_tile_image(sample, tile), (x, y))
        _draw_caption(draw, font, caption(sample.meta.get("labels", []), task), (x, y + tile), tile)
    _draw_cell_borders(draw, len(samples), cols, tile, cell_height)
    return sheet


def _tile_image(sample: Sample, tile: int) -> Image.Image:
    """The sample's image fitted inside a ``tile`` square (letterboxed, never cropped)."""
    try:
        img = to_rgb(decode(sample.image, shrink_to=tile))
    except UnreadableImageError as exc:
        raise DatasetError(f"sample {sample.key} holds an unreadable image: {exc}") from exc
    margin = max(2, tile // 32)  # keeps neighbouring images from touching
    inner = tile - 2 * margin
    # tiny images (28 px digits) are blown up with NEAREST so their pixels stay crisp
    resample = Image.Resampling.NEAREST if max(img.size) * 3 <= inner else Image.Resampling.LANCZOS
    fitted = ImageOps.contain(img, (inner, inner), method=resample)
    square = Image.new("RGB", (tile, tile), TILE_BACKGROUND)
    square.paste(fitted, ((tile - fitted.width) // 2, (tile - fitted.height) // 2))
    return square


def caption(labels: list[str], task: str) -> str:
    if not labels:
        return NO_TAGS
    return labels[0] if task == "single" else ", ".join(labels)


def fit_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float) -> str:
    """``text``, cut and ended with "…" when it is wider than ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    low, high = 0, len(text)  # longest prefix that fits with the ellipsis: binary search
    while low < high:
        mid = (low + high + 1) // 2
        if font.getlength(text[:mid].rstrip(" ,") + ELLIPSIS) <= width:
            low = mid
        else:
            high = mid - 1
    return text[:low].rstrip(" ,") + ELLIPSIS


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    text: str,
    origin: tuple[int, int],
    tile: int,
) -> None:
    pad = max(3, tile // 40)
    x, y = origin
    fitted = fit_text(text, font, tile - 2 * pad)
    colour = NO_TAGS_COLOUR if text == NO_TAGS else CAPTION_COLOUR
    # anchor "lm": left edge, vertically centred in the strip whatever the glyphs' descent
    draw.text((x + pad, y + caption_height(tile) / 2), fitted, fill=colour, font=font, anchor="lm")


def _draw_cell_borders(draw: ImageDraw.ImageDraw, count: int, cols: int, tile: int, cell_height: int) -> None:
    """Thin lines between drawn cells so each caption clearly belongs to the image above it.

    Only around cells in use: a half-empty last row stays blank instead of an empty grid.
    """
    rows = math.ceil(count / cols)
    for index in range(count):
        col, row = index % cols, index // cols
        x, y = col * tile, row * cell_height
        if col < cols - 1:
            draw.line([(x + tile - 1, y), (x + tile - 1, y + cell_height - 1)], fill=GRID_COLOUR)
        if row < rows - 1:
            draw.line([(x, y + cell_height - 1), (x + tile - 1, y + cell_height - 1)], fill=GRID_COLOUR)


__all__ = [
    "DatasetSummary",
    "caption",
    "caption_height",
    "contact_sheet",
    "cooccurrence",
    "describe_resize",
    "describe_source",
    "fit_text",
    "parse_grid",
    "render_summary",
    "reservoir",
    "sheet_size",
    "summarize",
]
