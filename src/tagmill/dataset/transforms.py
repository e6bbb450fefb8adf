"""From a decoded image to the tensor a model takes, the same way everywhere.

:class:`Preprocess` is the one description of that path (input size, resize method,
mean/std, interpolation). It is stored in a model bundle's ``model.json``, and
training, evaluation, ``tagmill predict`` and the server all build their transforms
from it, so preprocessing cannot drift between training and serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from tagmill.dataset.images import resize_bicubic_chw
from tagmill.errors import InputError

ResizeMethod = Literal["squish", "crop", "pad"]
Augmentation = Literal["none", "crop", "crop_color", "crop_color_transform"]

RESIZE_METHODS: tuple[str, ...] = ("squish", "crop", "pad")
#: Named like SageMaker image classification's ``augmentation_type`` (plus "none").
AUGMENTATIONS: tuple[str, ...] = ("none", "crop", "crop_color", "crop_color_transform")
_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input. Travels inside every model bundle."""

    input_size: int = 224
    #: squish: stretch to a square (keeps everything); crop: resize the shorter side and
    #: centre-crop; pad: letterbox onto a square, then resize
    resize_method: str = "squish"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    #: crop only: the fraction of the resized image kept by the centre crop
    crop_pct: float = 0.875
    pad_fill: tuple[int, int, int] = field(default=(0, 0, 0))

    def __post_init__(self) -> None:
        if self.resize_method not in RESIZE_METHODS:
            raise InputError(f"unknown resize method {self.resize_method!r}; choose {', '.join(RESIZE_METHODS)}")
        if self.interpolation not in _INTERPOLATION:
            raise InputError(f"unknown interpolation {self.interpolation!r}; choose {', '.join(_INTERPOLATION)}")
        if not 16 <= self.input_size <= 2048:
            raise InputError(f"image size {self.input_size} is out of range (16..2048 pixels)")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std", "pad_fill"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class _PadToSquare(torch.nn.Module):
    """Letterbox a PIL image onto a square canvas (centred), keeping its aspect ratio."""

    def __init__(self, fill: tuple[int, int, int]) -> None:
        super().__init__()
        self.fill = fill

    def forward(self, img: Image.Image) -> Image.Image:
        side = max(img.size)
        canvas = Image.new("RGB", (side, side), self.fill)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        return canvas


def _to_normalised_tensor(pre: Preprocess) -> list[torch.nn.Module]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]


def _resize(pre: Preprocess) -> list[torch.nn.Module]:
    size, mode = pre.input_size, _INTERPOLATION[pre.interpolation]
    if pre.resize_method == "squish":
        return [T.Resize((size, size), interpolation=mode, antialias=True)]
    if pre.resize_method == "pad":
        return [_PadToSquare(pre.pad_fill), T.Resize((size, size), interpolation=mode, antialias=True)]
    scaled = int(round(size / pre.crop_pct))
    return [T.Resize(scaled, interpolation=mode, antialias=True), T.CenterCrop(size)]


def eval_transform(pre: Preprocess) -> T.Compose:
    """Deterministic: PIL RGB image -> float tensor (3, input_size, input_size)."""
    return T.Compose([*_resize(pre), *_to_normalised_tensor(pre)])


def eval_array_transform(pre: Preprocess) -> Callable[[np.ndarray], torch.Tensor] | None:
    """:func:`eval_transform` for an upright (H, W, 3) uint8 array (``images.decode_jpeg_upright``)
    instead of a PIL image: the same sizes, crop and normalisation, and the same antialiased
    bicubic filter run by PyTorch's vectorised uint8 kernel (``images.resize_bicubic_chw``), so the
    inputs match the PIL path's up to the rounding of a few pixels by one 8-bit level (serving
    checks it: ``bundle.predictor.FAST_INPUT_TOLERANCE``). None where there is no such kernel
    (bilinear, nearest) or the method letterboxes a PIL image (pad): those keep the PIL path.
    """
    if pre.interpolation != "bicubic" or pre.resize_method == "pad":
        return None
    size = pre.input_size
    scaled = int(round(size / pre.crop_pct))
    # _to_normalised_tensor's /255 then (x - mean) / std, as one multiply and one subtract
    # on the uint8 tensor: the same values up to float rounding (at most 7e-7 with
    # ImageNet's mean and std) for a quarter of the cost of torchvision's v2 steps
    # (0.03 ms per 224-px image against 0.11: serving runs this once per request)
    scale = (1.0 / (255.0 * torch.tensor(pre.std, dtype=torch.float32))).view(3, 1, 1)
    offset = (torch.tensor(pre.mean, dtype=torch.float32) / torch.tensor(pre.std, dtype=torch.float32)).view(3, 1, 1)

    def transform(pixels: np.ndarray) -> torch.Tensor:
        if pre.resize_method == "squish":
            chw = resize_bicubic_chw(pixels, (size, size))  # (3, S, S) uint8
        else:  # crop
            height, width = pixels.shape[:2]
            chw = TF.center_crop(resize_bicubic_chw(pixels, _shorter_side_to(width, height, scaled)), [size, size])
        return chw.to(torch.float32).mul_(scale).sub_(offset)  # (3, S, S) float

    return transform


def _shorter_side_to(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) that ``T.Resize(side)`` gives: the shorter side becomes ``side``, the
    longer one is scaled and truncated (torchvision's rule, not ``images.shrunk_size``'s rounding)."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def train_transform(pre: Preprocess, augmentation: str = "crop") -> T.Compose:
    """Random augmentation for training, ending in the same tensor layout as eval."""
    if augmentation not in AUGMENTATIONS:
        raise InputError(f"unknown augmentation {augmentation!r}; choose {', '.join(AUGMENTATIONS)}")
    if augmentation == "none":
        return eval_transform(pre)
    size, mode = pre.input_size, _INTERPOLATION[pre.interpolation]
    steps: list[torch.nn.Module] = [_PadToSquare(pre.pad_fill)] if pre.resize_method == "pad" else []
    # squish keeps the whole picture, so its random crops stay large; crop/pad zoom in more
    scale = (0.6, 1.0) if pre.resize_method == "squish" else (0.35, 1.0)
    steps += [T.RandomResizedCrop(size, scale=scale, interpolation=mode, antialias=True), T.RandomHorizontalFlip()]
    if augmentation in ("crop_color", "crop_color_transform"):
        steps.append(T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02))
    if augmentation == "crop_color_transform":
        steps.append(T.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1), shear=5))
    return T.Compose([*steps, *_to_normalised_tensor(pre)])
