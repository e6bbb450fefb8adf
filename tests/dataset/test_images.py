import io

import numpy as np
import pytest
from PIL import Image

from tagmill.dataset import images as images_mod
from tagmill.dataset.images import FAST_PATH_PIXEL_TOLERANCE, FAST_PATH_TOLERANCE, pack_image
from tagmill.errors import UnreadableImageError
from tests import images


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_large_jpeg_is_shrunk_to_max_side_on_its_shorter_side():
    packed = pack_image(images.jpeg_bytes(1000, 1500), max_side=320)
    assert (packed.width, packed.height) == (320, 480)
    assert decoded(packed.data).size == (320, 480)
    assert packed.ext == "jpg"


def test_small_images_are_never_enlarged_and_plain_jpegs_keep_their_bytes():
    original = images.jpeg_bytes(48, 32)
    packed = pack_image(original, max_side=320)
    assert packed.data == original
    assert (packed.width, packed.height) == (48, 32)


def test_no_resize_keeps_size():
    packed = pack_image(images.png_bytes(400, 500), max_side=None)
    assert (packed.width, packed.height) == (400, 500)
    assert packed.ext == "png"


def test_exif_orientation_is_applied():
    packed = pack_image(images.exif_rotated_jpeg_bytes(60, 20, orientation=6), max_side=None)
    img = decoded(packed.data)
    assert img.size == (20, 60)  # displayed portrait, stored upright
    assert img.getexif().get(0x0112) in (None, 1)


def test_transparency_is_composited_on_white():
    img = decoded(pack_image(images.rgba_png_bytes(), max_side=None).data)
    assert img.mode == "RGB"
    assert img.getpixel((2, 2)) == (255, 255, 255)  # transparent half → white
    assert img.getpixel((38, 2)) == (255, 0, 0)  # opaque half stays red


@pytest.mark.parametrize(
    "maker", [images.grey_png_bytes, images.palette_png_bytes, images.cmyk_jpeg_bytes, images.grey16_png_bytes]
)
def test_other_modes_become_8bit_rgb(maker):
    img = decoded(pack_image(maker(), max_side=None).data)
    assert img.mode == "RGB"


def test_16bit_grey_is_scaled_not_clipped():
    img = decoded(pack_image(images.grey16_png_bytes(), max_side=None).data)
    arr = np.asarray(img)[..., 0]
    assert arr.min() == 0 and arr.max() == 255
    assert len(np.unique(arr)) > 200  # a gradient, not a clipped block of 255


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unreadable"),
        (b"this is a text file, not a picture", "not-an-image"),
        (images.truncated_jpeg_bytes(), "unreadable"),
        (images.decompression_bomb_png_bytes(), "bomb"),
    ],
    ids=["zero-bytes", "text", "truncated", "bomb"],
)
def test_bad_images_raise_with_a_reason(data, reason):
    with pytest.raises(UnreadableImageError) as info:
        pack_image(data, max_side=320)
    assert info.value.reason == reason


# --- the fast path for JPEGs that need shrinking, against the reference path ---------------


def poster_jpeg(width: int = 1000, height: int = 1500, seed: int = 0, **params) -> bytes:
    """Photo-like (smooth blobs plus pixel noise), as bench/import_speed.py's posters."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 50), max(2, width // 50), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    arr = np.clip(arr + rng.integers(-12, 12, size=arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    return images.encode(Image.fromarray(arr), "JPEG", quality=88, **params)


def photo_jpeg(name: str = "chelsea", long_side: int = 1500) -> bytes:
    """One of scikit-image's real photos, upscaled to ``long_side`` and saved as a JPEG."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    scale = long_side / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return images.encode(img, "JPEG", quality=92)


def texture_jpeg(name: str = "gravel") -> bytes:
    """A full-resolution texture (detail up to the pixel), tiled to 1000x1500: aliasing shows."""
    import skimage.data

    arr = np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
    return images.encode(Image.fromarray(np.tile(arr, (3, 2, 1))[:1500, :1000]), "JPEG", quality=92)


def psnr_and_mad(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float((diff**2).mean())
    return (99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)), float(np.abs(diff).mean())


def assert_within(a: np.ndarray, b: np.ndarray, tolerance: dict[str, float]) -> None:
    assert a.shape == b.shape
    psnr, mad = psnr_and_mad(a, b)
    assert psnr >= tolerance["psnr_db"] and mad <= tolerance["mean_abs_diff"], (psnr, mad)


def assert_fast_matches_reference(data: bytes, max_side: int = 320) -> None:
    assert images_mod._pack_shrunk_jpeg(data, max_side) is not None, "expected the fast path"
    fast, ref = pack_image(data, max_side), pack_image(data, max_side, fast=False)
    assert (fast.width, fast.height, fast.ext) == (ref.width, ref.height, ref.ext)
    a, b = np.asarray(decoded(fast.data).convert("RGB")), np.asarray(decoded(ref.data).convert("RGB"))
    assert a.shape == (ref.height, ref.width, 3)
    assert_within(a, b, FAST_PATH_TOLERANCE)


@pytest.mark.parametrize(
    "make",
    [
        lambda: poster_jpeg(seed=3),
        lambda: photo_jpeg("chelsea"),
        lambda: photo_jpeg("coffee"),
        lambda: photo_jpeg("astronaut"),
        lambda: texture_jpeg("gravel"),
        lambda: texture_jpeg("brick"),
    ],
    ids=["poster", "chelsea", "coffee", "astronaut", "gravel", "brick"],
)
def test_fast_path_pixels_match_the_reference_within_tolerance(make):
    data = make()
    # before encoding: the same filter, so the same pixels up to rounding
    ref = np.asarray(images_mod.resize_shorter_side(images_mod.to_rgb(images_mod.decode(data, shrink_to=320)), 320))
    header = Image.open(io.BytesIO(data))
    w, h = header.size
    header.draft("RGB", (int(w * 320 / min(w, h)) + 1, int(h * 320 / min(w, h)) + 1))
    fast = np.asarray(images_mod._resized_image(images_mod._decode_jpeg_rgb(data, header.size),
                                               images_mod.shrunk_size(header.size, 320)))
    assert_within(fast, ref, FAST_PATH_PIXEL_TOLERANCE)
    # and once packed (encoded)
    assert_fast_matches_reference(data)


@pytest.mark.parametrize(
    ("width", "height", "max_side"),
    [
        (1000, 1500, 320),  # the bench's posters: 1/2 scale
        (1500, 1001, 320),  # the drafted size (750x501) rounds differently from the header's
        (1001, 1500, 320),
        (999, 1333, 224),
        (2000, 2000, 320),  # 1/4 scale
        (641, 2000, 320),  # barely over 2x: 1/2 scale, a long thin image
        (321, 500, 320),  # one pixel over: no DCT scaling at all
        (4100, 2900, 320),  # 1/8 scale
        (1000, 1500, 700),
    ],
)
def test_fast_path_gives_the_reference_sizes(width, height, max_side):
    assert_fast_matches_reference(poster_jpeg(width, height, seed=width), max_side)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_fast_path_applies_exif_orientation_like_the_reference(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = poster_jpeg(600, 1000, seed=orientation, exif=exif.tobytes())
    assert_fast_matches_reference(data)
    img = decoded(pack_image(data, 320).data)
    assert img.size == ((320, 533) if orientation < 5 else (533, 320))
    assert img.getexif().get(0x0112) in (None, 1)


def test_fast_path_handles_greyscale_and_progressive_jpegs():
    grey = images.encode(decoded(poster_jpeg(800, 1200)).convert("L"), "JPEG", quality=90)
    assert decoded(grey).mode == "L"
    assert_fast_matches_reference(grey)
    assert decoded(pack_image(grey, 320).data).mode == "RGB"
    assert_fast_matches_reference(poster_jpeg(800, 1200, progressive=True))


def big_cmyk_jpeg() -> bytes:
    return images.encode(decoded(poster_jpeg(800, 1200)).convert("CMYK"), "JPEG", quality=90)


def jpeg_claiming_to_be_huge() -> bytes:
    """A real JPEG whose frame header says 30000x30000: Pillow's bomb guard must refuse it."""
    data = bytearray(poster_jpeg(400, 600))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2
    return bytes(data)


@pytest.mark.parametrize(
    "make",
    [
        big_cmyk_jpeg,
        lambda: images.png_bytes(800, 1200),  # lossless sources stay PNG
        lambda: images.jpeg_bytes(300, 200),  # fits already: the user's bytes are kept
        lambda: poster_jpeg(20000, 40, seed=1),  # a 1/8 decode still 6x over: Pillow box-reduces first
    ],
    ids=["cmyk", "png", "fits", "huge-factor"],
)
def test_special_cases_take_the_reference_path(make):
    data = make()
    assert images_mod._pack_shrunk_jpeg(data, 320) is None
    assert pack_image(data, 320) == pack_image(data, 320, fast=False)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: poster_jpeg(800, 1200)[:60_000], "unreadable"),  # truncated: libjpeg only warns
        (jpeg_claiming_to_be_huge, "bomb"),
    ],
    ids=["truncated", "bomb"],
)
def test_broken_jpegs_that_need_shrinking_still_raise_with_a_reason(make, reason):
    data = make()
    assert images_mod._pack_shrunk_jpeg(data, 320) is None
    with pytest.raises(UnreadableImageError) as info:
        pack_image(data, max_side=320)
    assert info.value.reason == reason
