"""Aligned thumbnails tell a copy (recompressed, resized, cropped) from a look-alike."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tagmill.doctor import thumbnails
from tagmill.doctor.duplicates import MAX_DIFFERENCE


def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((128, 128), Image.Resampling.LANCZOS)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


def icon(colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (72, 72), "white")
    ImageDraw.Draw(img).ellipse((12, 12, 60, 60), fill=colour, outline="black", width=3)
    return img


def difference(a: Image.Image, b: Image.Image) -> float:
    x, y = thumbnails.as_tensor([thumbnails.thumbnail(a)]), thumbnails.as_tensor([thumbnails.thumbnail(b)])
    return float(thumbnails.difference(x, y)[0])


@pytest.mark.parametrize("copy", [
    lambda img: jpeg(img, 50),
    lambda img: jpeg(img.resize((90, 90), Image.Resampling.LANCZOS), 85),
    lambda img: jpeg(crop(img, 0.03, 0.06, 0.05, 0.04), 85),
    lambda img: jpeg(crop(icon((220, 40, 40)), 0.06, 0.03, 0.03, 0.06), 60),
], ids=["recompressed", "resized", "cropped", "cropped icon"])
def test_copies_differ_little_once_aligned(copy):
    source = icon((220, 40, 40)) if copy.__code__.co_names.count("icon") else photo()
    assert difference(source, copy(source)) <= MAX_DIFFERENCE
    assert difference(copy(source), source) <= MAX_DIFFERENCE  # either may be the cropped one


def test_look_alikes_differ_somewhere():
    img = photo()
    # the same icon in another colour: same layout, same grey hash, a different picture
    assert difference(icon((220, 40, 40)), icon((40, 40, 220))) > MAX_DIFFERENCE
    # a different part of the same photo, and the photo with a mark on it
    assert difference(img, crop(img, 0.2, 0.0, 0.0, 0.2).resize(img.size)) > MAX_DIFFERENCE
    marked = img.copy()
    ImageDraw.Draw(marked).rectangle((40, 40, 64, 64), fill="white")
    assert difference(img, marked) > MAX_DIFFERENCE


def test_a_crop_needs_the_alignment(monkeypatch):
    """Without trying crop windows, a cropped copy of the photo looks like another picture."""
    img = photo()
    copy = crop(img, 0.06, 0.06, 0.0, 0.0).resize(img.size)
    aligned = difference(img, copy)
    monkeypatch.setattr(thumbnails, "_COARSE", torch.tensor([0]))  # only the whole picture (no cut)
    monkeypatch.setattr(thumbnails, "_REFINE", ())
    assert difference(img, copy) > 2 * aligned


def test_thumbnails_round_trip_and_empty_input():
    img = photo()
    t = thumbnails.as_tensor([thumbnails.thumbnail(img)] * 2)
    assert t.shape == (2, 3, thumbnails.SIDE, thumbnails.SIDE) and t.dtype == torch.float32
    assert np.isclose(float(thumbnails.difference(t[:1], t[1:])[0]), 0.0)
    assert thumbnails.difference(t[:0], t[:0]).shape == (0,)


FASHION = Path(__file__).resolve().parents[2] / "sample_data" / "fashion-mnist" / "images"


def garments(count: int) -> list[Image.Image]:
    """Real 28-px Fashion-MNIST pictures from the repository's sample data, as RGB."""
    return [Image.open(path).convert("RGB") for path in sorted(FASHION.glob("*.png"))[:count]]


@pytest.mark.parametrize("size", [(28, 28), (25, 26), (20, 20), (47, 13)])
def test_a_small_picture_is_enlarged_by_area_averages(size):
    """Each thumbnail cell averages the pixels it covers (so the picture's mean is kept),
    rather than taking the pixel nearest its centre as Pillow's BOX filter does when it
    enlarges."""
    img = garments(1)[0].resize(size, Image.Resampling.LANCZOS)
    cells = thumbnails.as_tensor([thumbnails.thumbnail(img)])[0]
    assert torch.allclose(cells.mean(dim=(1, 2)), torch.from_numpy(np.asarray(img, np.float32)).mean(dim=(0, 1)), atol=0.5)


@pytest.mark.parametrize("size, factor", [((72, 72), 2), ((52, 52), 12), ((512, 512), 3), ((130, 61), 48)])
def test_a_large_picture_is_shrunk_by_exact_area_averages(size, factor):
    """Each cell is the exact area average of the pixels it overlaps: the same as
    repeating every pixel ``factor`` times (so that each cell covers whole pixels) and
    taking plain block means. Pillow's BOX filter gives each cell the pixels whose
    centres fall in it, at full weight, which is not that for 72→48 or 52→48. The
    512-px photo is taller than ``ROWS_AT_ONCE``: its bands of rows must add up."""
    img = photo().resize(size, Image.Resampling.LANCZOS)
    big = np.asarray(img, np.float64).repeat(factor, axis=0).repeat(factor, axis=1)
    h, w = big.shape[0] // thumbnails.SIDE, big.shape[1] // thumbnails.SIDE
    assert h * thumbnails.SIDE == big.shape[0] and w * thumbnails.SIDE == big.shape[1]
    reference = big.reshape(thumbnails.SIDE, h, thumbnails.SIDE, w, 3).mean(axis=(1, 3))
    cells = np.frombuffer(thumbnails.thumbnail(img), np.uint8).reshape(thumbnails.SIDE, thumbnails.SIDE, 3)
    assert np.abs(cells - reference).max() <= 0.5 + 1e-6  # rounding only
    if size in ((72, 72), (52, 52)):
        box = np.frombuffer(box_thumbnail(img), np.uint8).reshape(cells.shape)
        assert np.abs(box - reference).max() > 5


def horse(side: int) -> Image.Image:
    """scikit-image's horse silhouette, black on white, as a ``side``-px icon."""
    import skimage.data

    return Image.fromarray(np.where(skimage.data.horse(), 255, 0).astype(np.uint8)).convert("RGB").resize(
        (side, side), Image.Resampling.LANCZOS)


def box_thumbnail(image: Image.Image) -> bytes:
    """The thumbnail as pictures of 48 px and more had it before: Pillow's BOX filter."""
    return image.resize((thumbnails.SIDE, thumbnails.SIDE), Image.Resampling.BOX).tobytes()


def test_a_resized_icon_stays_within_the_threshold():
    """A 72-px icon and its copy resized to 52 px (then JPEG 85, as the bench plants them):
    with Pillow's BOX thumbnails the silhouette's edge lands in other cells (26.8 apart),
    with exact area averages the two agree (1.1)."""
    source = horse(72)
    copy = jpeg(source.resize((52, 52), Image.Resampling.LANCZOS), 85)

    def aligned(make: object) -> float:
        a, b = (thumbnails.as_tensor([make(x)]) for x in (source, copy))  # type: ignore[operator]
        return float(thumbnails.difference(a, b)[0])

    assert aligned(thumbnails.thumbnail) <= MAX_DIFFERENCE / 3
    assert aligned(box_thumbnail) > MAX_DIFFERENCE


def nearest_thumbnail(image: Image.Image) -> bytes:
    """The thumbnail as it was made before: Pillow's BOX filter, which enlarges by taking
    the pixel nearest each cell's centre."""
    return image.resize((thumbnails.SIDE, thumbnails.SIDE), Image.Resampling.BOX).tobytes()


def test_copies_of_tiny_pictures_stay_within_the_threshold():
    """3–6% crops and 70–90% resizes of 28-px pictures, then JPEG (the bench's near copies):
    with nearest-pixel enlargement 18 of these 60 differ by more than the threshold once
    aligned (up to 40.7), with area averages none (at most 11.2)."""
    rng = random.Random(0)
    pairs = []
    for img in garments(30):
        cut = [round(28 * rng.uniform(0.03, 0.06)) for _ in range(4)]  # the bench's 3-6% per side
        side = round(28 * rng.uniform(0.70, 0.90))
        pairs += [(img, jpeg(img.crop((cut[0], cut[1], 28 - cut[2], 28 - cut[3])), 85)),
                  (img, jpeg(img.resize((side, side), Image.Resampling.LANCZOS), 85))]

    def over(make: object) -> int:
        a = thumbnails.as_tensor([make(x) for x, _ in pairs])  # type: ignore[operator]
        b = thumbnails.as_tensor([make(y) for _, y in pairs])  # type: ignore[operator]
        return int((thumbnails.difference(a, b) > MAX_DIFFERENCE).sum())

    assert over(thumbnails.thumbnail) == 0
    assert over(nearest_thumbnail) >= 10
