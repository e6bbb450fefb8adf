"""Near copies judged by the features, the aligned layout and the aligned pixels together:
a cropped copy is found although the crop moved its whole-picture hash; another framing
of the same scene is not a copy; a recompressed icon is found although JPEG flipped the
bits of its perceptual hash."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagmill.doctor import thumbnails
from tagmill.doctor.duplicates import LAYOUT, MIN_KEPT, find_duplicates
from tagmill.doctor.neighbours import nearest_neighbours
from tagmill.doctor.scan import _facts


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS)


def crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))


def jpeg_bytes(img: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def facts_of(images: dict[str, Image.Image]):
    return [_facts(key, jpeg_bytes(img), {"id": key, "labels": ["x"]}, "train") for key, img in images.items()]


def test_a_cropped_copy_is_found_and_another_framing_is_not():
    coffee, astronaut = photo("coffee"), photo("astronaut")
    images = {
        "coffee": coffee,
        "coffee-cropped": crop(coffee, 0.05, 0.05, 0.05, 0.05),  # a copy: 5% off every side
        "coffee-reframed": crop(coffee, 0.2, 0.0, 0.0, 0.2).resize(coffee.size),  # the same scene, framed otherwise
        "astronaut": astronaut,
        "astronaut-resized": astronaut.resize((96, 96), Image.Resampling.LANCZOS),
    }
    facts = facts_of(images)
    # the crop moved the whole picture's layout past what a near copy may differ by: only
    # the layout of the aligned window finds it
    by_id = {f.id: f for f in facts}
    assert whole_layout(by_id["coffee"], by_id["coffee-cropped"]) > LAYOUT
    # identical features: only the hashes and the pixels decide
    features = torch.ones(len(facts), 8)
    pairs = find_duplicates(facts, features, nearest_neighbours(features, len(facts) - 1))
    found = {frozenset((facts[p.a].id, facts[p.b].id)) for p in pairs}
    assert found == {frozenset(("coffee", "coffee-cropped")), frozenset(("astronaut", "astronaut-resized"))}
    cropped = next(p for p in pairs if {facts[p.a].id, facts[p.b].id} == {"coffee", "coffee-cropped"})
    assert cropped.layout <= LAYOUT and MIN_KEPT <= cropped.kept < 0.9


def test_a_deep_crop_is_a_framing_not_a_copy():
    """10% off every side keeps 64% of the picture: aligned, it matches, but the window
    is too deep for a copy."""
    coffee = photo("coffee")
    facts = facts_of({"coffee": coffee, "deep": crop(coffee, 0.1, 0.1, 0.1, 0.1)})
    features = torch.ones(2, 8)
    assert find_duplicates(facts, features, nearest_neighbours(features, 1)) == []


def whole(pictures: torch.Tensor) -> torch.Tensor:
    """(P, 63) the layout coefficients of each whole picture (no crop window)."""
    rows = thumbnails._area_matrices(torch.zeros(len(pictures)), torch.ones(len(pictures)), thumbnails.HASH_GRID)
    return thumbnails._low_frequencies(pictures, rows, rows)


def whole_layout(a, b) -> float:
    """The layout distance of two images' facts, whole picture against whole picture."""
    pictures = thumbnails.as_tensor([a.thumbnail, b.thumbnail])
    u, v = whole(pictures)
    return float((u - v).norm() / ((u.square().sum() + v.square().sum()) / 2).sqrt())


def test_the_layout_is_imagehash_phash_before_its_bits():
    """The coefficients are those ``imagehash.phash`` takes the signs of (8×8 lowest of the
    DCT of the 32×32 grey picture, here from the 48-px thumbnail), up to scale."""
    import scipy.fftpack

    img = photo("astronaut")
    mine = whole(thumbnails.as_tensor([thumbnails.thumbnail(img)]))[0].numpy()
    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    reference = scipy.fftpack.dct(scipy.fftpack.dct(grey, axis=0), axis=1)[:8, :8].flatten()[1:]
    mine, reference = mine / np.linalg.norm(mine), reference / np.linalg.norm(reference)
    assert np.linalg.norm(mine - reference) < 0.1


FASHION = Path(__file__).resolve().parents[2] / "sample_data" / "fashion-mnist" / "images"


def garment_icon(name: str) -> Image.Image:
    """A real Fashion-MNIST garment of the repository's sample data drawn as a 72-px icon:
    its grey levels as red ink, 36 px wide, on white (the setting of the bench's emoji)."""
    garment = Image.open(FASHION / name).convert("L").resize((36, 36), Image.Resampling.LANCZOS)
    icon = Image.new("RGB", (72, 72), "white")
    icon.paste(Image.new("RGB", garment.size, (200, 60, 40)), (18, 18), garment)
    return icon


def hash_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    """Bits between the perceptual hashes of two whole thumbnails, as the aligned hash
    compared them before (each coefficient above or below the median of the 64)."""
    rows = thumbnails._area_matrices(torch.zeros(2), torch.ones(2), thumbnails.HASH_GRID)
    grey = (torch.stack([a, b]) * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(dim=1)
    dct = thumbnails._dct_rows()
    low = (dct @ (rows @ grey @ rows.transpose(-1, -2)) @ dct.T).flatten(1)
    bits = low > low.median(dim=1, keepdim=True).values
    return int((bits[0] != bits[1]).sum())


@pytest.mark.parametrize("name", ["00075.png", "00076.png", "00173.png"])
def test_a_recompressed_icon_is_found_although_its_hash_bits_flip(name):
    """JPEG at quality 50 moves these icons' aligned thumbnails by 3.2–5.6 grey levels
    (``MAX_DIFFERENCE`` is 15), yet flips 12–14 of their 64 hash bits (the limit was 10):
    on white most low coefficients sit near their median. The coefficients themselves
    move little (layout distance 0.023–0.035)."""
    icon = garment_icon(name)
    png = io.BytesIO()
    icon.save(png, format="PNG")
    facts = [_facts(key, data, {"id": key, "labels": ["x"]}, "train")
             for key, data in (("icon", png.getvalue()), ("copy", jpeg_bytes(icon, 50)))]
    pictures = thumbnails.as_tensor([f.thumbnail for f in facts])
    assert hash_bits(pictures[0], pictures[1]) > 10
    features = torch.ones(2, 8)
    pairs = find_duplicates(facts, features, nearest_neighbours(features, 1))
    assert [(p.kind, p.layout <= LAYOUT) for p in pairs] == [("near", True)]


def test_pairs_measured_a_few_at_a_time_are_measured_alike(monkeypatch):
    """Features and thumbnails are gathered a chunk of pairs at a time (bounded memory at
    250,000 images): chunks of three pairs give every pair the same numbers as one chunk."""
    from tagmill.doctor import duplicates

    coffee, astronaut = photo("coffee"), photo("astronaut")
    images = {"coffee": coffee, "coffee-cropped": crop(coffee, 0.05, 0.05, 0.05, 0.05),
              "coffee-small": coffee.resize((100, 100)), "astronaut": astronaut,
              "astronaut-resized": astronaut.resize((96, 96), Image.Resampling.LANCZOS)}
    facts = facts_of(images)
    features = torch.rand(len(facts), 16, generator=torch.Generator().manual_seed(0)) + 1.0  # every cosine above 0.8
    neighbours = nearest_neighbours(features, len(facts) - 1)
    whole = duplicates.measure_pairs(facts, features, neighbours)
    monkeypatch.setattr(duplicates, "PAIRS_AT_ONCE", 3)
    monkeypatch.setattr(thumbnails, "CHUNK", 3)
    assert duplicates.measure_pairs(facts, features, neighbours) == whole
    assert len(whole[1]) > 3  # aligned pairs: more than one chunk of three
