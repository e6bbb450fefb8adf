"""The capture folder's parts (``formats/captures.py``): plain tar files any reader takes,
whose size is known before they are written (the size cap counts on it)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tagmill.formats import captures
from tagmill.formats.base import image_extension
from tests import images


def test_a_part_is_a_tar_that_tar_itself_reads_and_its_size_is_known_beforehand(tmp_path: Path) -> None:
    members = [("a.jpg", images.jpeg_bytes(64, 48, seed=1)), ("b.png", b"\x89PNG" + bytes(508)), ("c.jpg", b"")]
    predictions = b'{"image":"a.jpg"}\n{"image":"b.png"}\n{"image":"c.jpg"}\n'
    data = captures.pack_part(members, predictions, mtime=1_780_000_000)
    assert len(data) == captures.part_size([len(d) for _, d in members] + [len(predictions)])
    assert len(data) % 512 == 0  # whole blocks, closed by two zero blocks, no 10 kB record padding
    part = tmp_path / captures.part_name("20261129T000000.000000Z-abcd1234-000001", 3)
    part.write_bytes(data)
    assert part.name == "part-20261129T000000.000000Z-abcd1234-000001-n3.tar"
    if shutil.which("tar"):  # GNU tar, as a person would open it
        listing = subprocess.run(["tar", "tf", str(part)], capture_output=True, text=True, check=True).stdout
        assert listing.split() == ["a.jpg", "b.png", "c.jpg", captures.PREDICTIONS]
        subprocess.run(["tar", "xf", str(part), "-C", str(tmp_path)], check=True)
        assert (tmp_path / "a.jpg").read_bytes() == members[0][1]
    assert [(name, d) for name, d, _ in captures.part_inputs(str(part))] == [
        (f"{part}/{name}", d) for name, d in members]
    assert list(captures.part_records(str(part))) == [f"{part}/{name}" for name, _ in members]
    (tmp_path / "capture.json").write_text("{}")
    folder = captures.list_folder(str(tmp_path))
    assert folder.parts == [(str(part), 3)]


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_extension_of_an_images_bytes_is_the_one_pillow_names(kind: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, kind)
    expected = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}[kind]
    assert image_extension(buffer.getvalue()) == expected
    assert image_extension(b"not an image at all") == ".img"
