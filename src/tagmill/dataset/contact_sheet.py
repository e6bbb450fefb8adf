"""A contact sheet (``tagmill inspect --sheet``): a seeded random grid of samples with
their labels, streaming the shards so a dataset of any size costs a few tiles of memory.
"""

from __future__ import annotations

import io
import math
import random
import re
from collections.abc import Iterable, Iterator

from PIL import Image, ImageDraw, ImageFont, ImageOps

from tagmill import storage
from tagmill.dataset.images import decode, to_rgb
from tagmill.dataset.manifest import load_manifest, shard_locations
from tagmill.dataset.shards import Sample, iter_shard
from tagmill.dataset.summary import NO_TAGS
from tagmill.errors import DatasetError, InputError, UnreadableImageError

#: A contact sheet is for eyeballing: more tiles than this is a mistake, not a request.
MAX_TILES = 400
MIN_TILE, MAX_TILE = 48, 1024

TILE_BACKGROUND = (222, 222, 222)  # neutral grey: letterbox bars read as "not image"
CAPTION_BACKGROUND = (255, 255, 255)
CAPTION_COLOUR = (20, 20, 20)
NO_TAGS_COLOUR = (120, 120, 120)  # an untagged image is data, but not a label: shown greyed
GRID_COLOUR = (180, 180, 180)
ELLIPSIS = "…"




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
    "MAX_TILES",
    "caption",
    "caption_height",
    "contact_sheet",
    "fit_text",
    "font_size",
    "parse_grid",
    "reservoir",
    "sheet_size",
]
