"""Why the model said a class: Grad-CAM heatmaps from the bundle's torch weights.

``explain(predictor, image)`` answers what the predictor answers for the image, plus
one heatmap per class explained (the top class for a single-label model, each predicted
tag for a multi-label one, or the classes asked for), over the image as it was decoded.
The heat is Grad-CAM's (``pytorch-grad-cam``, the maintained implementation): the
target layer's activations weighted by the class score's gradient, mapped back through
the bundle's resize (squish, centre crop or letterbox) onto the picture.

Explanations always run the torch weights, whatever backend answers predictions: an
ONNX graph has no gradients. A predictor on the torch backend lends its module (copied
once, so that Grad-CAM's hooks never see a concurrent prediction's forward pass); one
on the ONNX backend reads ``model.safetensors`` from the bundle it was loaded from.

Target layers, one rule per backbone family (``target_layer``):

- EfficientNet (Lite, B*, V2; timm's ``EfficientNet`` class): ``bn2``, the 1x1 head
  convolution's map, which is the map the head pools;
- every other timm CNN (ResNet, ConvNeXt, MobileNetV3, RegNet, ...): the module timm
  names as its last feature stage (``feature_info[-1]``), the final spatial map;
- plain ViTs (timm's ``VisionTransformer``): the last block's first norm, its patch
  tokens laid back on their grid (the class and register tokens dropped).

Anything else (Swin's channels-last stages, hybrid transformers) is refused with an
InputError naming the family, rather than drawn wrong: the target layer's output is
checked to be a (B, C, h, w) map of the channels timm announces before any heat is drawn.
"""

from __future__ import annotations

import copy
import io
import math
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from tagmill import storage
from tagmill.bundle.format import WEIGHTS_FILE, load_bundle
from tagmill.bundle.predictor import Prediction, Predictor
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import BundleError, InputError, TagmillError, UnreadableImageError
from tagmill.progress import SILENT, Progress

#: how much of the overlay is the picture (the rest is the colour-mapped heat): half keeps
#: both readable, as pytorch-grad-cam's own examples do
IMAGE_WEIGHT = 0.5


@dataclass(frozen=True)
class Heatmap:
    """Where the evidence for one class lies in one image."""

    label: str
    index: int  #: the class's position in the bundle's class list
    score: float  #: the class's probability, as the predictor answered it
    #: (H, W) float32 in [0, 1] over the decoded image (1: the strongest evidence; 0 also
    #: outside the region the model saw, e.g. what a centre crop cut off)
    heat: np.ndarray = field(repr=False)

    def overlay(self, image: Image.Image) -> Image.Image:
        """``image`` (RGB, the decoded picture) with the heat drawn over it in colour."""
        require_grad_cam()
        from pytorch_grad_cam.utils.image import show_cam_on_image

        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3) in [0, 1]
        if rgb.shape[:2] != self.heat.shape:
            raise InputError(f"the heatmap is {self.heat.shape[1]}x{self.heat.shape[0]}, the image "
                             f"{image.width}x{image.height}: overlay it on the image it explains")
        return Image.fromarray(show_cam_on_image(rgb, self.heat, use_rgb=True, image_weight=IMAGE_WEIGHT))

    def overlay_png(self, image: Image.Image) -> bytes:
        """The overlay as PNG bytes (what a web page or a file wants)."""
        buffer = io.BytesIO()
        self.overlay(image).save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass(frozen=True)
class Explanation:
    image: Image.Image  #: the decoded RGB picture the heatmaps lie over
    prediction: Prediction  #: what the predictor (its own backend) answered
    heatmaps: list[Heatmap]  #: one per class explained, in the order asked (or predicted)


def explain(predictor: Predictor, image: Any, *, classes: Sequence[str] | None = None) -> Explanation:
    """Heatmaps for ``image`` (encoded bytes, a path or URL, a PIL image or a numpy
    array: whatever ``Predictor.predict`` takes) from ``predictor``'s bundle.

    ``classes``: the class names to explain; None explains the top class (single-label)
    or every tag at or above its threshold (multi-label; the most probable tag when none
    is). An unknown class name is an InputError naming the model's classes; an unusable
    image an UnreadableImageError; a predictor whose torch weights cannot be had (built
    from an ONNX graph alone, or a bundle without ``model.safetensors``) an InputError.
    Thread-safe: explanations of one predictor run one at a time.
    """
    indices = _class_indices(predictor, classes)
    picture, inputs = _load(predictor, image)
    prediction = predictor.predict_tensor(inputs.unsqueeze(0))[0]
    if indices is None:
        indices = _predicted(predictor, prediction)
    if not indices:
        return Explanation(picture, prediction, [])
    model, lock = _explaining_model(predictor)
    batch = inputs.unsqueeze(0).repeat(len(indices), 1, 1, 1)  # (K, 3, S, S): one per class
    with lock:
        maps = _grad_cam(model, batch, indices)  # (K, S, S) in [0, 1]
    names = predictor.classes
    return Explanation(picture, prediction, [
        Heatmap(names[i], i, prediction.probabilities[i], _onto_image(m, picture.size, predictor.meta.preprocess))
        for i, m in zip(indices, maps, strict=True)
    ])


# --- which classes ---------------------------------------------------------------


def _class_indices(predictor: Predictor, classes: Sequence[str] | None) -> list[int] | None:
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [classes]
    position = {name: i for i, name in enumerate(predictor.classes)}
    return [position[name] for name in check_class_names(classes, predictor.classes)]


def check_class_names(classes: Sequence[str], known: Sequence[str]) -> list[str]:
    """``classes`` once each, in order; an InputError naming the model's classes for a
    name it does not have."""
    names = set(known)
    unknown = [c for c in classes if c not in names]
    if unknown:
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        raise InputError(f"no class {unknown[0]!r} in this model", hint=f"its classes: {shown}")
    return list(dict.fromkeys(classes))


def default_classes(prediction: Prediction) -> list[str]:
    """What an explanation shows unless told: the answer's labels (the top class, or
    each tag at or above its threshold, in class order)."""
    if prediction.labels:
        return list(prediction.labels)
    # a multi-label answer with no tag: the most probable one still shows what the model looked at
    return [prediction.top[0][0]] if prediction.top else []


def _predicted(predictor: Predictor, prediction: Prediction) -> list[int]:
    position = {name: i for i, name in enumerate(predictor.classes)}
    return [position[label] for label in default_classes(prediction)]


def _load(predictor: Predictor, image: Any) -> tuple[Image.Image, torch.Tensor]:
    """The decoded picture (the overlays lie on it) and the model input (3, S, S), each made
    exactly as predictions make them: an encoded JPEG's input comes from the fast path, so
    the explained scores are the served ones."""
    import os

    try:
        if isinstance(image, (str, os.PathLike)):
            image = storage.read_bytes(os.fspath(image))
        load: Callable[[], Image.Image] = predictor._loader(image)
        picture = load()
        if isinstance(image, (bytes, bytearray)):
            return picture, predictor._input_loader(image)()
        return picture, predictor.transform(picture)
    except TagmillError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # e.g. broken EXIF met by to_rgb
        raise UnreadableImageError(f"corrupt image: {exc}") from exc


# --- the torch model and its target layer ----------------------------------------

#: predictor -> (its explaining model, the lock its hooks need)
_MODELS: weakref.WeakKeyDictionary[Predictor, tuple[nn.Module, threading.Lock]] = weakref.WeakKeyDictionary()
_MODELS_LOCK = threading.Lock()


def _explaining_model(predictor: Predictor) -> tuple[nn.Module, threading.Lock]:
    with _MODELS_LOCK:
        found = _MODELS.get(predictor)
        if found is None:
            found = (_torch_model(predictor), threading.Lock())
            _MODELS[predictor] = found
        return found


def _torch_model(predictor: Predictor) -> nn.Module:
    if predictor.torch_model is not None:
        # a copy: Grad-CAM hooks the module, and a server may run predictions on the original meanwhile
        return copy.deepcopy(predictor.torch_model).eval()
    if predictor.location is None:
        raise InputError("explanations need the bundle's torch weights; this predictor was built from an ONNX graph alone",
                         hint="load it with Predictor.from_bundle(BUNDLE, backend='onnx')")
    if not storage.exists(storage.join(predictor.location, WEIGHTS_FILE)):
        raise InputError(f"bundle {predictor.location} has no torch weights ({WEIGHTS_FILE}): explanations need them "
                         f"(an ONNX graph has no gradients)", hint="export the bundle again with `tagmill export`")
    try:
        model, _ = load_bundle(predictor.location)  # on the CPU: the ONNX graph may hold the GPU
    except BundleError as exc:
        raise InputError(f"explanations need the bundle's torch weights: {exc.message}", hint=exc.hint) from exc
    return model


def target_layer(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The layer whose activations Grad-CAM weighs for ``model`` (a timm classifier), and
    the function that turns its output into a (B, C, h, w) map (see the module docstring)."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, EfficientNet):
        return model.bn2, _checked_map(model.bn2.num_features, "EfficientNet")
    if isinstance(model, VisionTransformer):
        return model.blocks[-1].norm1, _token_grid(model.num_prefix_tokens)
    info = getattr(model, "feature_info", None)
    if not info:
        raise InputError(f"cannot explain a {type(model).__name__}: timm announces no feature stages for it",
                         hint="explanations support timm's CNNs and plain ViTs")
    last = info[-1]
    return model.get_submodule(last["module"]), _checked_map(last["num_chs"], type(model).__name__)


def _checked_map(channels: int, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def check(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"cannot explain a {family}: its last stage gives a {list(x.shape)} tensor, not the "
                             f"(B, {channels}, h, w) map Grad-CAM weighs", hint="explanations support timm's CNNs and plain ViTs")
        return x

    return check


def _token_grid(prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]  # (B, h*w, C): class/register tokens dropped
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise InputError(f"cannot lay {patches.shape[1]} ViT patch tokens on a square grid")
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)  # (B, C, h, w)

    return reshape


def _grad_cam(model: nn.Module, batch: torch.Tensor, indices: list[int]) -> np.ndarray:
    """(K, 3, S, S) inputs, one class index per row -> (K, S, S) heat in [0, 1]."""
    require_grad_cam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = target_layer(model)
    # gradients are the point: undo a caller's inference_mode / no_grad for this block only
    with torch.inference_mode(False), torch.enable_grad(), GradCAM(model, [layer], reshape_transform=reshape) as cam:
        heat = cam(batch.clone(), targets=[ClassifierOutputTarget(i) for i in indices])  # (K, S, S)
    return np.nan_to_num(np.asarray(heat, dtype=np.float32))


def require_grad_cam() -> None:
    """InputError unless ``pytorch-grad-cam`` (the ``explain`` extra) is installed: it brings
    OpenCV (~150 MB), which a server that never explains need not carry."""
    import importlib.util

    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise InputError("explanations need the grad-cam package, which is not installed",
                         hint="pip install 'tagmill[explain]'")


def _onto_image(heat: np.ndarray, size: tuple[int, int], pre: Preprocess) -> np.ndarray:
    """(S, S) heat over the model's input -> (H, W) over the decoded image, inverting the
    bundle's resize: squish stretches back, a letterbox drops its bars, a centre crop
    lands in the middle (what it cut off gets no heat)."""
    width, height = size
    square = Image.fromarray(heat.astype(np.float32), mode="F")
    if pre.resize_method == "squish":
        return np.asarray(square.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32).clip(0, 1)
    if pre.resize_method == "pad":
        side = max(width, height)  # the letterbox canvas (dataset/transforms.py _PadToSquare)
        full = np.asarray(square.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
        left, top = (side - width) // 2, (side - height) // 2
        return full[top:top + height, left:left + width].clip(0, 1)
    # crop: the shorter side was resized to S / crop_pct, then the centre S x S kept
    scale = round(pre.input_size / pre.crop_pct) / min(width, height)
    seen = round(pre.input_size / scale)  # the kept square's side, in image pixels
    out = Image.new("F", (width, height), 0.0)
    out.paste(square.resize((seen, seen), Image.Resampling.BILINEAR), ((width - seen) // 2, (height - seen) // 2))
    return np.asarray(out, dtype=np.float32).clip(0, 1)


# --- many images to files (``tagmill predict --explain DIR``) ---------------------


@dataclass
class ExplainSummary:
    written: list[str] = field(default_factory=list)  #: the overlay files, in input order
    failed: list[tuple[str, str]] = field(default_factory=list)  #: (input, why) of inputs not explained


def explain_to_folder(predictor: Predictor, inputs: Iterator[tuple[str, bytes | None, str | None]], out: str, *,
                      total: int | None = None, progress: Progress = SILENT) -> ExplainSummary:
    """One overlay PNG per explained class of every input, written (atomically) to
    ``out`` as ``NNNNN_<name>_<class>.png`` (NNNNN: the input's position, so two files
    named alike in different folders never collide). ``inputs`` yields (name, bytes or
    None, error), as ``batch_predict`` reads them; an unreadable input is counted in
    ``failed`` and the rest go on."""
    summary = ExplainSummary()
    storage.makedirs(out)
    with progress.task("explaining", total) as advance:
        for position, (name, data, error) in enumerate(inputs):
            try:
                if data is None:
                    raise UnreadableImageError(error or "unreadable")
                found = explain(predictor, data)
                for heatmap in found.heatmaps:
                    location = storage.join(out, f"{position:05d}_{_safe(_stem(name))}_{_safe(heatmap.label)}.png")
                    storage.write_bytes(location, heatmap.overlay_png(found.image))
                    summary.written.append(location)
            except UnreadableImageError as exc:
                summary.failed.append((name, exc.message))
            advance(1)
    return summary


def explain_paths(predictor: Predictor, paths: list[str], out: str, *, split: str | None = None,
                  progress: Progress = SILENT) -> ExplainSummary:
    """``explain_to_folder`` over what ``tagmill predict`` reads from ``paths`` (files,
    folders, packed datasets, URLs), in the same order."""
    from tagmill.bundle.batch_predict import plan, task_inputs

    tasks = plan(paths, split)
    inputs = (item for task in tasks for item in task_inputs(task))
    return explain_to_folder(predictor, inputs, out, total=sum(t.size for t in tasks), progress=progress)


def _stem(name: str) -> str:
    base = name.rsplit(":", 1)[-1] if "://" not in name else name  # "DATASET:id" -> "id"
    base = base.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def _safe(text: str) -> str:
    """A file-name-safe form of a name or class (letters, digits, - _ . kept), at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "x"


__all__ = ["Explanation", "ExplainSummary", "Heatmap", "explain", "explain_paths", "explain_to_folder", "require_grad_cam", "target_layer"]
