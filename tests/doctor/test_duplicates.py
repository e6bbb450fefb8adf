"""Near copies judged by the features, the aligned hash and the aligned pixels together:
a cropped copy is found although the crop moved its whole-picture hash; another framing
of the same scene is not a copy."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import torch
from PIL import Image

from tagmill.doctor import thumbnails
from tagmill.doctor.duplicates import HASH_BITS, MIN_KEPT, find_duplicates
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
    # the crop moved the whole picture's hash past what a near copy may differ by: only
    # the hash of the aligned window finds it
    by_id = {f.id: f for f in facts}
    assert bin(by_id["coffee"].phash ^ by_id["coffee-cropped"].phash).count("1") > HASH_BITS
    # identical features: only the hashes and the pixels decide
    features = torch.ones(len(facts), 8)
    pairs = find_duplicates(facts, features, nearest_neighbours(features, len(facts) - 1))
    found = {frozenset((facts[p.a].id, facts[p.b].id)) for p in pairs}
    assert found == {frozenset(("coffee", "coffee-cropped")), frozenset(("astronaut", "astronaut-resized"))}
    cropped = next(p for p in pairs if {facts[p.a].id, facts[p.b].id} == {"coffee", "coffee-cropped"})
    assert cropped.aligned_bits <= HASH_BITS and MIN_KEPT <= cropped.kept < 0.9


def test_a_deep_crop_is_a_framing_not_a_copy():
    """10% off every side keeps 64% of the picture: aligned, it matches, but the window
    is too deep for a copy."""
    coffee = photo("coffee")
    facts = facts_of({"coffee": coffee, "deep": crop(coffee, 0.1, 0.1, 0.1, 0.1)})
    features = torch.ones(2, 8)
    assert find_duplicates(facts, features, nearest_neighbours(features, 1)) == []


def test_the_aligned_hash_of_a_whole_picture_is_imagehash_phash():
    img = photo("astronaut")
    pictures = thumbnails.as_tensor([thumbnails.thumbnail(img)])
    whole = thumbnails._area_matrices(torch.zeros(1), torch.ones(1), thumbnails.HASH_GRID)
    mine = thumbnails._hash_bits(pictures, whole, whole)[0].numpy()
    # from the 48-px thumbnail rather than the full picture: the low frequencies agree
    reference = np.asarray(imagehash.phash(img.convert("L")).hash).flatten()
    assert (mine == reference).mean() >= 0.95
