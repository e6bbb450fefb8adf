"""Decode what users bring into clean 8-bit RGB, resized once at import.

Training should never decode a 3000-pixel JPEG or meet a CMYK file, so every image
is normalised here: EXIF orientation applied, transparency composited on white,
palette / greyscale / CMYK / 16-bit converted to 8-bit RGB, and the shorter side
capped at ``max_side``. Pillow's decompression-bomb guard stays on.

The common case, an RGB or greyscale JPEG (baseline or progressive) that needs shrinking,
takes a fast path (``_pack_shrunk_jpeg``): decoded by simplejpeg at the DCT scale Pillow's
draft would pick, resized with the same antialiased bicubic filter as Pillow's (PyTorch's
uint8 kernel, vectorised: ~4x faster than Pillow's), EXIF orientation applied, re-encoded
as before. Output sizes are identical to the reference path's and the pixels match it
within ``FAST_PATH_PIXEL_TOLERANCE`` (``FAST_PATH_TOLERANCE`` once encoded). Everything
else (other formats, CMYK, images that fit already, anything the fast decoder complains
about) goes through the reference path, ``pack_image(..., fast=False)``.
"""

from __future__ import annotations

import functools
import io
import multiprocessing
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from tagmill.errors import UnreadableImageError

if TYPE_CHECKING:
    import torch

#: Formats that are stored losslessly; their images are re-encoded as PNG, others as JPEG.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "GIF", "TIFF", "PPM", "PGM", "PBM", "TGA", "ICO"})
JPEG_QUALITY = 90
#: Pillow shrinks by a whole factor (box filter) first when the bicubic would span more than this.
REDUCING_GAP = 3.0


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
    if min(img.size) <= max_side:
        return img
    # reducing_gap lets Pillow shrink by whole factors first: much faster, same quality.
    return img.resize(shrunk_size(img.size, max_side), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)


def shrunk_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side brought down to ``max_side``, rounded as always."""
    width, height = size
    scale = max_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def pack_image(data: bytes, max_side: int | None, *, fast: bool = True) -> PackedImage:
    """Decode, normalise, resize and re-encode one image for a shard.

    A JPEG that needs shrinking takes the fast path (module docstring) unless ``fast`` is
    False; the result has the same size and matches the reference within FAST_PATH_TOLERANCE.
    """
    if fast and max_side is not None:
        packed = _pack_shrunk_jpeg(data, max_side)
        if packed is not None:
            return packed
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


#: How far the fast path may drift from the reference path (pack_image(fast=False)) on the
#: same image, as PSNR in dB (at least) and mean absolute difference in 8-bit levels (at most).
#: Resized pixels, before encoding: the same filter, so only rounding differs. Measured on
#: bench/import_speed.py's posters, scikit-image's photos (chelsea, coffee, astronaut, rocket)
#: upscaled to 1500 px, full-resolution textures (grass, gravel, brick) tiled to 1000x1500, and
#: 34 other sizes (1/1 to 1/8 DCT scales, tall and wide): PSNR >= 68.9 dB, mean |diff| <= 0.008, no pixel off by more than 2 levels.
FAST_PATH_PIXEL_TOLERANCE = {"psnr_db": 60.0, "mean_abs_diff": 0.05}
#: The packed JPEGs, decoded: those rounding differences flip a few quantisation decisions of
#: the encoder (quality 90 itself is ~40 dB from its input). Measured: PSNR >= 50.4 dB, mean
#: |diff| <= 0.26.
FAST_PATH_TOLERANCE = {"psnr_db": 45.0, "mean_abs_diff": 0.5}

_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _pack_shrunk_jpeg(data: bytes, max_side: int) -> PackedImage | None:
    """The fast path for an RGB or greyscale JPEG that needs shrinking; None for anything else.

    Same decisions as the reference path: the DCT scale Pillow's draft picks (so the same
    intermediate size and the same output size), EXIF orientation applied (after the resize,
    on the small image), the same antialiased bicubic filter, the same encoder and quality.
    Whatever it does not handle, or any doubt (a decoder warning, an unexpected size), returns
    None and the reference path decides, errors included.
    """
    img = _open_header(data)
    if img is None or img.format != "JPEG" or img.mode not in ("RGB", "L") or min(img.size) <= max_side:
        return None
    width, height = img.size
    scale = max_side / min(width, height)
    img.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))  # as decode(): sets the size only
    drafted = img.size
    size = shrunk_size(drafted, max_side)
    if min(drafted) / max_side >= 2 * REDUCING_GAP:
        return None  # Pillow would box-reduce first; rare (a side over ~16,000 px): keep its exact output
    orientation = img.getexif().get(0x0112, 1)
    pixels = _decode_jpeg_rgb(data, drafted)
    if pixels is None:
        return None
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    small = _resized_image(pixels, size, turned=orientation in (5, 6, 7, 8))
    if transpose is not None:
        small = small.transpose(transpose)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return PackedImage(buffer.getvalue(), "jpg", *small.size)


def _open_header(data: bytes) -> Image.Image | None:
    """Pillow's header parse under the bomb guard; None where the reference path would raise."""
    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, UnidentifiedImageError):
        return None
    except (OSError, SyntaxError, ValueError, EOFError):  # the reference path says which
        return None


def _decode_jpeg_rgb(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """(height, width, 3) uint8 at the drafted ``size``, by libjpeg-turbo's DCT scaling; None on
    any decoder complaint.

    simplejpeg decodes straight into one array (Pillow decodes into its 4-byte pixels, and
    handing those to numpy copies them again): ~1 ms less per poster.
    """
    try:
        # strict: any libjpeg warning (a truncated or damaged stream) is an error here, and
        # the reference path, which Pillow runs, then decides.
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1], strict=True)
    except ValueError:
        return None
    if pixels.shape != (size[1], size[0], 3):
        return None
    return pixels


@functools.cache
def _torch() -> ModuleType:
    """torch, imported on first use (~1 s): only processes that shrink JPEGs pay for it."""
    import torch

    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)  # a pool worker: one core each, the pool fills the others
    return torch


def _resized_image(pixels: np.ndarray, size: tuple[int, int], *, turned: bool = False) -> Image.Image:
    """:func:`resize_bicubic_chw` as an RGB image. The kernel writes three planes; Pillow
    interleaves them as it stores them (``merge``, ~0.05 ms for a 320x480 poster), where a
    (height, width, 3) copy in numpy for ``fromarray`` cost ~0.5 ms: 9% of packing a poster."""
    planes = resize_bicubic_chw(pixels, size, turned=turned).numpy()
    return Image.merge("RGB", [Image.frombuffer("L", size, plane, "raw", "L", 0, 1) for plane in planes])


def decode_jpeg_upright(data: bytes, *, shrink_to: int | None = None) -> np.ndarray | None:
    """``to_rgb(decode(data, shrink_to=shrink_to))`` as a (height, width, 3) uint8 array, for an
    RGB or greyscale JPEG; None for anything else, and on any doubt, so that the caller takes
    the reference path (which also raises its errors).

    Serving's fast path (``Predictor``): the same DCT scale as ``decode``'s draft, decoded by
    simplejpeg straight into the array (no Pillow image, no copy into numpy), EXIF orientation
    applied to the array as ``to_rgb`` applies it to the image. Greyscale comes out as three
    equal channels, as ``to_rgb``'s convert makes it.
    """
    img = _open_header(data)
    if img is None or img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    try:
        if shrink_to is not None:
            width, height = img.size
            scale = shrink_to / min(width, height)
            if scale < 1:
                img.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))  # as decode(): sets the size only
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, EOFError):  # a broken EXIF block: the reference path says so
        return None
    pixels = _decode_jpeg_rgb(data, img.size)
    if pixels is None:
        return None
    return _transpose_array(pixels, orientation)


def _transpose_array(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """A (h, w, 3) array turned as Pillow's ``transpose`` turns an image for this EXIF orientation
    (``_ORIENTATION_TRANSPOSE``), as views; one copy at the end."""
    turned = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
        6: lambda a: np.rot90(a, -1),  # ROTATE_270: a quarter turn clockwise
        7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
        8: lambda a: np.rot90(a, 1),  # ROTATE_90: a quarter turn counter-clockwise
    }.get(orientation)
    return pixels if turned is None else np.ascontiguousarray(turned(pixels))


def resize_bicubic_chw(pixels: np.ndarray, size: tuple[int, int], *, turned: bool = False) -> torch.Tensor:
    """Pillow's BICUBIC (antialiased, a = -0.5) of a (h, w, 3) uint8 array to ``size`` (width,
    height), as a (3, height, width) uint8 tensor: the pixels ``resize(size, BICUBIC)`` gives
    (a few differ by one level).

    PyTorch's ``interpolate(mode="bicubic", antialias=True)`` on uint8 is a port of Pillow's
    resampling (the same kernel support and fixed-point arithmetic, AVX2). Both resize in two
    passes, rounding to uint8 between them, and the pass order changes the rounding: PyTorch
    always goes horizontal first, Pillow (>= 11.2) vertical first when the height shrinks by
    more than twice as many pixels as the width. So Pillow's order is two calls, height then
    width (PyTorch skips a pass whose size is unchanged), rather than a transposed copy
    (numpy's transposed copy of a 3-channel uint8 image costs more than the resize itself).
    ``turned``: the image will be turned by 90 degrees afterwards (EXIF orientation), as the
    reference path does before resizing, so Pillow's rule applies to the turned axes.
    """
    torch = _torch()
    height, width = pixels.shape[:2]
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # channels-last NCHW view, no copy
    if (height, width) == (size[1], size[0]):
        return x[0].contiguous()
    if turned:  # Pillow sees (height, width) as (width, height); its first pass is our other axis
        vertical_first = not (width - size[0] > 0 and width - size[0] > 2 * (height - size[1]))
    else:
        vertical_first = height - size[1] > 0 and height - size[1] > 2 * (width - size[0])
    interpolate = torch.nn.functional.interpolate
    if vertical_first:
        x = interpolate(x, size=(size[1], width), mode="bicubic", antialias=True)
    # the uint8 kernel reads the channels-last view and writes contiguous planes (so no copy)
    return interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True)[0].contiguous()
