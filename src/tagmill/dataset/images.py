"""Decode what users bring into clean 8-bit RGB, resized once at import.

Training should never decode a 3000-pixel JPEG or meet a CMYK file, so every image
is normalised here: EXIF orientation applied, transparency composited on white,
palette / greyscale / CMYK / 16-bit converted to 8-bit RGB, and the shorter side
capped at ``max_side``. Pillow's decompression-bomb guard stays on.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tagmill.errors import UnreadableImageError

#: Formats that are stored losslessly; their images are re-encoded as PNG, others as JPEG.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "GIF", "TIFF", "PPM", "PGM", "PBM", "TGA", "ICO"})
JPEG_QUALITY = 90


@dataclass(frozen=True)
class PackedImage:
    """An image ready to go into a shard."""

    data: bytes
    ext: str  #: "jpg" or "png": the extension its shard member gets
    width: int
    height: int


def decode(data: bytes, *, shrink_to: int | None = None) -> Image.Image:
    """Open and fully decode ``data``; any failure is an UnreadableImageError.

    With ``shrink_to``, a JPEG is decoded at 1/2, 1/4 or 1/8 scale when its shorter
    side stays >= ``shrink_to`` (libjpeg's DCT scaling): a 1000x1500 poster bound for
    320 px decodes ~4x faster. Other formats ignore it.
    """
    if not data:
        raise UnreadableImageError("empty file (0 bytes)", reason="unreadable")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its pixel limit and raises above 2x;
            # treat both as a bomb so a hostile file never gets decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if shrink_to is not None and img.format == "JPEG":
                width, height = img.size
                scale = shrink_to / min(width, height)
                if scale < 1:
                    img.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(f"decompression bomb refused: {exc}", reason="bomb") from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImageError("not an image (unknown format)", reason="not-an-image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # truncated JPEGs, broken PNG chunks, ...
        raise UnreadableImageError(f"corrupt image: {exc}", reason="unreadable") from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, upright, with any transparency composited on white."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in {"I", "F"} or mode.startswith("I;16"):
        img = Image.fromarray(_scale_to_uint8(np.asarray(img)), "L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in {"LA", "La", "PA"}:
        img = img.convert("RGBA")
    if img.mode in {"RGBA", "RGBa"}:
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit / 32-bit / float greys onto 0..255 (Pillow's convert would clip)."""
    arr = arr.astype(np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)


def resize_shorter_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the shorter side is ``max_side``; never enlarge."""
    width, height = img.size
    shorter = min(width, height)
    if shorter <= max_side:
        return img
    scale = max_side / shorter
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap lets Pillow shrink by whole factors first: much faster, same quality.
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def pack_image(data: bytes, max_side: int | None) -> PackedImage:
    """Decode, normalise, resize and re-encode one image for a shard."""
    img = decode(data, shrink_to=max_side)
    drafted = img.mode == "RGB" and img.format == "JPEG" and img.size != header_size(data)
    rgb = to_rgb(img)
    if max_side is not None:
        rgb = resize_shorter_side(rgb, max_side)
    if img.format == "JPEG" and not drafted and rgb.size == img.size and _is_plain_rgb_jpeg(img):
        # Nothing changed: keep the user's bytes, bit for bit (no generation loss).
        return PackedImage(data, "jpg", *rgb.size)
    lossless = img.format in LOSSLESS_FORMATS or (img.format == "WEBP" and img.info.get("lossless"))
    buffer = io.BytesIO()
    if lossless:
        rgb.save(buffer, format="PNG", compress_level=6)
        return PackedImage(buffer.getvalue(), "png", *rgb.size)
    rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return PackedImage(buffer.getvalue(), "jpg", *rgb.size)


def header_size(data: bytes) -> tuple[int, int]:
    """The stored size of an image, read from its header only."""
    return Image.open(io.BytesIO(data)).size


def _is_plain_rgb_jpeg(img: Image.Image) -> bool:
    orientation = img.getexif().get(0x0112, 1)
    return img.mode == "RGB" and orientation in (1, None)
