"""Tiny real images, made on the fly, in every shape users send.

Each function returns encoded bytes (or writes a file) so tests exercise the real
decoders: JPEG, PNG, RGBA, greyscale, 16-bit, CMYK, palette, EXIF-rotated.
"""

from __future__ import annotations

import io
import zlib
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(width: int = 48, height: int = 32, seed: int = 0) -> np.ndarray:
    """A deterministic RGB uint8 array with structure (gradients + a seeded tint)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    tint = rng.integers(0, 256, size=3)
    arr = np.stack(
        [(xs * 255 // max(width - 1, 1) + tint[0]) % 256,
         (ys * 255 // max(height - 1, 1) + tint[1]) % 256,
         ((xs + ys) * 4 + tint[2]) % 256],
        axis=-1,
    )
    return arr.astype(np.uint8)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def jpeg_bytes(width: int = 48, height: int = 32, seed: int = 0, quality: int = 90) -> bytes:
    return encode(Image.fromarray(pattern(width, height, seed)), "JPEG", quality=quality)


def png_bytes(width: int = 48, height: int = 32, seed: int = 0) -> bytes:
    return encode(Image.fromarray(pattern(width, height, seed)), "PNG")


def rgba_png_bytes(width: int = 40, height: int = 40) -> bytes:
    """Red square, left half fully transparent (should become white)."""
    arr = np.zeros((height, width, 4), np.uint8)
    arr[..., 0] = 255
    arr[:, width // 2:, 3] = 255
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def grey_png_bytes(width: int = 40, height: int = 30) -> bytes:
    return encode(Image.fromarray(pattern(width, height)[..., 0], "L"), "PNG")


def grey16_png_bytes(width: int = 40, height: int = 30) -> bytes:
    """16-bit greyscale PNG with values spanning 0..65535."""
    arr = (np.linspace(0, 65535, width * height).reshape(height, width)).astype(np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def palette_png_bytes(width: int = 40, height: int = 30) -> bytes:
    return encode(Image.fromarray(pattern(width, height)).convert("P"), "PNG")


def cmyk_jpeg_bytes(width: int = 40, height: int = 30) -> bytes:
    return encode(Image.fromarray(pattern(width, height)).convert("CMYK"), "JPEG")


def exif_rotated_jpeg_bytes(width: int = 60, height: int = 20, orientation: int = 6) -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90°': it displays as portrait."""
    img = Image.fromarray(pattern(width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes())


def truncated_jpeg_bytes() -> bytes:
    data = jpeg_bytes(64, 64)
    return data[: len(data) // 2]


def decompression_bomb_png_bytes(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side×side pixels (over Pillow's limit) that is a few KB on disk."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    raw = zlib.compressobj(9)
    body = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
