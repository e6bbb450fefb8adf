import io

import numpy as np
import pytest
from PIL import Image

from tagmill.dataset.images import pack_image
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
