"""Shared fixtures: small real image collections in the layouts users bring."""

from __future__ import annotations

from pathlib import Path

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
