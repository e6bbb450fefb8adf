"""The fast path for request JPEGs (simplejpeg + PyTorch's uint8 bicubic) against the PIL path
it replaces: same decoded pixels, model inputs within FAST_INPUT_TOLERANCE, same scores
within a stated tolerance, and everything it does not handle left to the PIL path."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from tagmill.bundle import Predictor
from tagmill.bundle.predictor import FAST_INPUT_TOLERANCE
from tagmill.dataset.images import decode, decode_jpeg_upright, to_rgb
from tagmill.dataset.transforms import Preprocess, eval_array_transform, eval_transform
from tests import images
from tests.bundle import multilabel_onnx_bundle, tiny_meta, tiny_model


def photo_jpeg(width: int, height: int, seed: int = 0, *, grey: bool = False, **params) -> bytes:
    """Photo-like (smooth blobs plus pixel noise), as bench/serve_load.py's request images."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    arr = np.clip(arr + rng.integers(-10, 10, size=arr.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return images.encode(img.convert("L") if grey else img, "JPEG", quality=88, **params)


def skimage_jpeg(name: str, long_side: int) -> bytes:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    scale = long_side / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return images.encode(img, "JPEG", quality=92)


def with_orientation(data: bytes, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return images.encode(Image.open(io.BytesIO(data)), "JPEG", quality=95, exif=exif.tobytes())


JPEGS = {
    "poster-600x800": lambda: photo_jpeg(600, 800, 1),  # 1/2 DCT scale at 224
    "wide-800x310": lambda: photo_jpeg(800, 310, 2),  # no DCT scaling, height shrinks least
    "tall-300x790": lambda: photo_jpeg(300, 790, 3),  # Pillow resizes vertically first here
    "big-2000x1500": lambda: photo_jpeg(2000, 1500, 4),  # 1/4 scale
    "small-120x90": lambda: photo_jpeg(120, 90, 5),  # enlarged
    "grey": lambda: photo_jpeg(500, 400, 6, grey=True),
    "progressive": lambda: photo_jpeg(640, 480, 7, progressive=True),
    "chelsea": lambda: skimage_jpeg("chelsea", 700),
    "astronaut": lambda: skimage_jpeg("astronaut", 1000),
    **{f"exif-{o}": (lambda o=o: with_orientation(photo_jpeg(500, 300, 8), o)) for o in range(2, 9)},
}
PREPROCESS = {
    "squish-224": Preprocess(input_size=224),
    "crop-160": Preprocess(input_size=160, resize_method="crop", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}


def pil_path(data: bytes, pre: Preprocess, shrink_to: int) -> torch.Tensor:
    return eval_transform(pre)(to_rgb(decode(data, shrink_to=shrink_to)))


def in_levels(a: torch.Tensor, b: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """|a - b| of two normalised inputs, back in 8-bit levels of the resized image."""
    return (a - b).abs() * torch.tensor(pre.std).view(3, 1, 1) * 255


@pytest.mark.parametrize("name", list(JPEGS))
def test_the_fast_decoder_gives_the_pil_paths_pixels(name: str) -> None:
    data = JPEGS[name]()

    fast = decode_jpeg_upright(data, shrink_to=224)
    reference = np.asarray(to_rgb(decode(data, shrink_to=224)))

    assert fast is not None, "expected the fast path"
    # the same libjpeg-turbo decode at the same DCT scale, turned the same way
    assert fast.shape == reference.shape and np.array_equal(fast, reference)


@pytest.mark.parametrize("method", list(PREPROCESS))
@pytest.mark.parametrize("name", list(JPEGS))
def test_fast_inputs_match_the_pil_path_within_tolerance(name: str, method: str) -> None:
    pre = PREPROCESS[method]
    shrink_to = pre.input_size if method.startswith("squish") else round(pre.input_size / pre.crop_pct)
    data = JPEGS[name]()

    fast = eval_array_transform(pre)(decode_jpeg_upright(data, shrink_to=shrink_to))
    reference = pil_path(data, pre, shrink_to)

    assert fast.shape == reference.shape == (3, pre.input_size, pre.input_size)
    levels = in_levels(fast, reference, pre)
    assert float(levels.max()) <= FAST_INPUT_TOLERANCE["max_levels"] + 1e-3, name
    assert float(levels.mean()) <= FAST_INPUT_TOLERANCE["mean_levels"], name


def test_served_scores_stay_within_tolerance_of_the_pil_path() -> None:
    """A real exported graph on onnxruntime: every JPEG above, through predict_bytes (the fast
    path), against the same graph on the PIL path's inputs."""
    predictor = Predictor.from_bundle(multilabel_onnx_bundle(), backend="onnx", intra_op_threads=1)
    pre = predictor.meta.preprocess
    blobs = [make() for make in JPEGS.values()]

    served = predictor.predict_bytes(blobs)
    reference = torch.sigmoid(predictor.logits(torch.stack([pil_path(b, pre, pre.input_size) for b in blobs])))

    for name, answer, expected in zip(JPEGS, served, reference.tolist(), strict=True):
        assert answer.ok, name
        # a level or two on a few pixels moves this model's probabilities by ~1e-5
        assert answer.probabilities == pytest.approx(expected, abs=1e-3), name


@pytest.mark.parametrize(
    "data",
    [images.png_bytes(80, 50), images.cmyk_jpeg_bytes(), images.truncated_jpeg_bytes(), b"", b"<html>no</html>",
     images.decompression_bomb_png_bytes()],
    ids=["png", "cmyk", "truncated", "empty", "garbage", "bomb"],
)
def test_what_the_fast_decoder_does_not_handle_is_left_to_the_pil_path(data: bytes) -> None:
    assert decode_jpeg_upright(data, shrink_to=64) is None


def test_errors_and_other_formats_are_still_answered_by_the_pil_path() -> None:
    predictor = Predictor(tiny_model(bias=(0.0, 3.0, 1.0)), tiny_meta())
    png, cmyk, truncated, jpeg = images.png_bytes(80, 50), images.cmyk_jpeg_bytes(), images.truncated_jpeg_bytes(), \
        images.jpeg_bytes(80, 50)

    answers = predictor.predict_bytes([png, cmyk, truncated, jpeg])

    assert [a.ok for a in answers] == [True, True, False, True]
    assert answers[2].error.startswith("corrupt image")
    by_pil = predictor.predict_images([to_rgb(decode(png)), to_rgb(decode(cmyk))])
    assert answers[0].probabilities == pytest.approx(by_pil[0].probabilities, abs=1e-6)
    assert answers[1].probabilities == pytest.approx(by_pil[1].probabilities, abs=1e-6)


@pytest.mark.parametrize("pre", [Preprocess(resize_method="pad"), Preprocess(interpolation="bilinear")],
                         ids=["pad", "bilinear"])
def test_methods_without_a_fast_kernel_keep_the_pil_path(pre: Preprocess) -> None:
    predictor = Predictor(tiny_model(), replace(tiny_meta(), preprocess=pre))
    data = photo_jpeg(300, 200)

    assert eval_array_transform(pre) is None and predictor.array_transform is None
    assert torch.equal(predictor.preprocess(data), pil_path(data, pre, pre.input_size))
