"""Aligned thumbnails tell a copy (recompressed, resized, cropped) from a look-alike."""

from __future__ import annotations

import io

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
    monkeypatch.setattr(thumbnails, "_COARSE", torch.tensor([0.0]))  # only the whole picture
    monkeypatch.setattr(thumbnails, "_REFINE", ())
    assert difference(img, copy) > 2 * aligned


def test_thumbnails_round_trip_and_empty_input():
    img = photo()
    t = thumbnails.as_tensor([thumbnails.thumbnail(img)] * 2)
    assert t.shape == (2, 3, thumbnails.SIDE, thumbnails.SIDE) and t.dtype == torch.float32
    assert np.isclose(float(thumbnails.difference(t[:1], t[1:])[0]), 0.0)
    assert thumbnails.difference(t[:0], t[:0]).shape == (0,)
