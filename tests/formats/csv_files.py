"""Writing the CSV sources and image folders the CSV reader tests read."""

from __future__ import annotations

from pathlib import Path

from tests import images


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def add_images(folder: Path, *names: str) -> None:
    """Real images named ``names`` (PNG for .png names, JPEG otherwise), distinct by seed."""
    for seed, name in enumerate(names):
        data = images.png_bytes(seed=seed) if name.lower().endswith(".png") else images.jpeg_bytes(seed=seed)
        images.write(folder / name, data)
