"""Shared fixtures: small real image collections in the layouts users bring."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run two at a time (pytest -n 2) on two cores: one torch thread each, in this
# process and in every tagmill subprocess a test starts, avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# rich wraps messages at the terminal width (80 without a terminal): a long temporary
# path then splits the phrase a test looks for, depending on the path's length
os.environ["COLUMNS"] = "240"
# No test reaches the Hugging Face hub, and none sees the developer's own hub cache:
# pretrained weights come from caches the tests build (tests/hub_cache.py), or not at all.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="tagmill-tests-hub-"), "hub")

import pytest

from tests import images


def make_class_folders(root: Path, classes: dict[str, int], size: tuple[int, int] = (48, 32)) -> Path:
    """root/<class>/<n>.jpg with a distinct, seeded pattern per image."""
    seed = 0
    for name, count in classes.items():
        for i in range(count):
            images.write(root / name / f"{i:03d}.jpg", images.jpeg_bytes(*size, seed=seed))
            seed += 1
    return root


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """Three classes of real JPEGs, plus the junk real folders contain."""
    root = make_class_folders(tmp_path / "photos", {"cat": 12, "dog": 10, "owl": 8})
    images.write(root / "cat" / "broken.jpg", images.truncated_jpeg_bytes())
    images.write(root / "dog" / "empty.jpg", b"")
    images.write(root / "dog" / "notes.txt", b"shot on a phone")
    images.write(root / "owl" / "fake.png", b"<html>not a png</html>")
    images.write(root / ".DS_Store", b"\x00\x00")
    images.write(root / "stray.jpg", images.jpeg_bytes())
    return root


COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 30)}


def make_colour_classes(root: Path, per_class: int, classes: tuple[str, ...] = ("red", "green", "blue")) -> Path:
    """An easy, learnable dataset: noisy images whose dominant colour is the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        for i in range(per_class):
            base = np.array(COLOURS[name], dtype=np.int16)
            arr = np.clip(base + rng.integers(-60, 60, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            images.write(root / name / f"{i:03d}.png", images.encode(Image.fromarray(arr), "PNG"))
    return root


def make_colour_tags(root: Path, count: int) -> Path:
    """``count`` two-colour pictures (left half, right half) tagged with their colours,
    one tag or two (every third image), in ``root/tags.csv``; returns the CSV."""
    import numpy as np
    from PIL import Image

    names = list(COLOURS)
    lines = ["id,tags"]
    for i in range(count):
        tags = [names[i % 4]] + ([names[(i + 1) % 4]] if i % 3 == 0 else [])
        arr = np.zeros((40, 40, 3), np.uint8)
        arr[:, :20] = COLOURS[tags[0]]
        arr[:, 20:] = COLOURS[tags[-1]]
        images.write(root / f"{i}.png", images.encode(Image.fromarray(arr), "PNG"))
        lines.append(f'{i},"{", ".join(tags)}"')
    (root / "tags.csv").write_text("\n".join(lines) + "\n")
    return root / "tags.csv"


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A packed single-label dataset of 3 colour classes (48 train / 12 val)."""
    from tagmill.dataset.importer import ImportOptions, import_dataset

    root = tmp_path_factory.mktemp("colours")
    make_colour_classes(root / "src", 20)
    import_dataset(str(root / "src"), str(root / "ds"), ImportOptions(val_fraction=0.2))
    return str(root / "ds")
