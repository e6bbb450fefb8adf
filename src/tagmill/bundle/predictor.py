"""Preprocess → infer → postprocess, the same for every caller and both backends.

Images become tensors only through ``eval_transform(meta.preprocess)`` after the
import decoder (``decode`` + ``to_rgb``), so a served image is treated exactly like
an imported one. Encoded RGB and greyscale JPEGs (what requests mostly carry) take a
fast path to the same tensor: ``decode_jpeg_upright`` (simplejpeg, the same DCT scale)
and ``eval_array_transform`` (the same filter, PyTorch's uint8 kernel); ~2x less
preprocessing per request, within ``FAST_INPUT_TOLERANCE`` of the PIL path. The torch and ONNX backends differ only in the call that turns a
preprocessed batch into logits; decoding, softmax/sigmoid, thresholds and top-k are
one code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from tagmill import storage
from tagmill.bundle.format import INT8_FILE, ONNX_FILE, BundleError, BundleMeta, load_bundle, read_checked, read_meta
from tagmill.dataset.images import decode, decode_jpeg_upright, to_rgb
from tagmill.dataset.transforms import Preprocess, eval_array_transform, eval_transform
from tagmill.errors import InputError, UnreadableImageError
from tagmill.objective import objective
from tagmill.train.device import resolve_device

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[str, ...] = ("torch", "onnx")
#: which ONNX graph runs: "auto" (INT8 when the bundle has one and it runs on the CPU), "fp32", "int8"
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "int8")
#: A per-call threshold: one value for every class, or one per class in class order.
Threshold = float | Sequence[float]
#: How far the fast JPEG path's model inputs may lie from the PIL path's, in 8-bit levels of
#: the resized image: the largest difference of any value, and the mean one. The decoders are
#: both libjpeg-turbo at the same DCT scale (the pixels are equal) and the filters the same
#: fixed-point arithmetic, so only the rounding of a few pixels differs (tests/bundle/
#: test_fast_jpeg.py's JPEGs: 1 level when shrinking, 2 when enlarging; mean <= 0.007).
FAST_INPUT_TOLERANCE = {"max_levels": 2.0, "mean_levels": 0.05}


@dataclass(frozen=True)
class Prediction:
    """The answer for one image. With ``error`` set, every other field is empty."""

    #: every class, in class order (the SageMaker image classifier's answer)
    probabilities: list[float] = field(default_factory=list)
    #: single-label: [top-1]; multi-label: every tag at or above its threshold
    labels: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    #: the top-k (label, probability) pairs, most probable first
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values (``top`` as label/score objects)."""
        return {
            "probabilities": self.probabilities,
            "labels": self.labels,
            "scores": self.scores,
            "top": [{"label": label, "score": score} for label, score in self.top],
            "error": self.error,
        }


class Predictor:
    """Runs a bundle's model on images, bytes or preprocessed tensors.

    ``model`` is a torch module for ``backend="torch"`` (moved to ``device`` and put in
    eval mode); for ``backend="onnx"`` it is the ONNX graph (bytes), an
    ``onnxruntime.InferenceSession``, or a torch module that is exported (and
    verified) in memory. ``device`` is "auto" (a GPU when there is one), "cpu", "cuda"
    or "cuda:N"; the ONNX backend runs on onnxruntime's CUDA provider for a GPU when its
    GPU build is installed (``runs_on`` says what was chosen); ``intra_op_threads`` sets
    its thread count (None: onnxruntime's default).
    Forward passes run in chunks of at most ``batch_size`` images.
    """

    def __init__(
        self,
        model: Any,
        meta: BundleMeta,
        *,
        backend: str = "torch",
        device: str | torch.device = "cpu",
        intra_op_threads: int | None = None,
        batch_size: int = 32,
    ) -> None:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, not {batch_size}")
        self.meta = meta
        self.backend = backend
        self.precision = "fp32"  #: which graph or weights run: "fp32", or "int8" (set by from_bundle)
        #: the bundle it was loaded from (set by from_bundle): explanations read its torch weights
        #: when the backend is ONNX (``bundle/explain.py``)
        self.location: str | None = None
        #: the torch module of the torch backend (None for ONNX), for explanations
        self.torch_model: torch.nn.Module | None = model if backend == "torch" else None
        self.batch_size = batch_size
        self.transform = eval_transform(meta.preprocess)
        #: the same transform for an upright uint8 array; None: every image takes the PIL path
        self.array_transform = eval_array_transform(meta.preprocess)
        self._shrink_to = _decode_size(meta.preprocess)
        resolved = resolve_device(str(device))
        if backend == "torch":
            self._run = _torch_runner(model, resolved)
            self.runs_on = f"torch on {resolved}"
        else:
            self._run, self.runs_on = _onnx_runner(model, meta, intra_op_threads, resolved,
                                                   required=str(device) != "auto")

    @classmethod
    def from_bundle(
        cls,
        location: str,
        backend: str = "torch",
        *,
        device: str | torch.device = "cpu",
        intra_op_threads: int | None = None,
        batch_size: int = 32,
        precision: str = "auto",
    ) -> Predictor:
        """Load the bundle at ``location``; the ONNX backend needs its ``model.onnx``.
        ``precision``: "auto" runs the bundle's INT8 graph when it has one and the ONNX
        backend runs on the CPU (onnxruntime's integer kernels are the CPU's), "fp32"
        never, "int8" always (an error without one)."""
        if precision not in PRECISIONS:
            raise InputError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
        int8 = False
        if backend == "onnx":
            meta = read_meta(location)
            int8 = _runs_int8(location, meta, precision, resolve_device(str(device)))
            model: Any = read_checked(location, INT8_FILE, meta.int8["sha256"]) if int8 else _read_onnx(location, meta)
        else:
            if precision == "int8":
                raise InputError("the INT8 graph runs on the onnx backend", hint="add --backend onnx")
            model, meta = load_bundle(location, device=resolve_device(str(device)))
        predictor = cls(model, meta, backend=backend, device=device, intra_op_threads=intra_op_threads,
                        batch_size=batch_size)
        predictor.location = location
        if int8:
            predictor.precision = "int8"
            predictor.runs_on += ", INT8 graph"
        return predictor

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes

    # --- entry points ------------------------------------------------------------

    def predict_bytes(
        self, items: Sequence[bytes], *, top_k: int | None = None, threshold: Threshold | None = None
    ) -> list[Prediction]:
        """Encoded images (JPEG, PNG, ...); an undecodable item gets ``error`` set."""
        if isinstance(items, (bytes, bytearray)):
            raise InputError("predict_bytes takes a list of images; wrap a single image in a list")
        return self._predict([lambda data=data: self._from_bytes(data) for data in items], top_k, threshold)

    def predict_images(
        self, images: Sequence[Image.Image], *, top_k: int | None = None, threshold: Threshold | None = None
    ) -> list[Prediction]:
        """PIL images in any mode; they are normalised like decoded bytes."""
        return self._predict([lambda img=img: self._from_image(lambda: to_rgb(img)) for img in images], top_k, threshold)

    def predict(
        self, images: Any, *, top_k: int | None = None, threshold: Threshold | None = None
    ) -> Prediction | list[Prediction]:
        """One image or a list of them, each a PIL image, a numpy array (H, W) or
        (H, W, 3|4), uint8 or floats in [0, 1], a path or URL, or encoded bytes; one
        Prediction for one image, a list for a list. Files and bytes are decoded as
        served images are; an unreadable one gets ``error`` set."""
        if isinstance(images, (list, tuple)):
            return self._predict([self._input_loader(image) for image in images], top_k, threshold)
        return self._predict([self._input_loader(images)], top_k, threshold)[0]

    def _input_loader(self, image: Any) -> Callable[[], torch.Tensor]:
        """How to get the model input from what a caller passed: encoded images (bytes, files)
        through :meth:`_from_bytes` (the fast JPEG path where it applies), the rest as PIL images."""
        import os

        if isinstance(image, (bytes, bytearray)):
            return lambda: self._from_bytes(bytes(image))
        if isinstance(image, (str, os.PathLike)):
            return lambda: self._from_bytes(storage.read_bytes(os.fspath(image)))
        load = self._loader(image)
        return lambda: self._from_image(load)

    def _loader(self, image: Any) -> Callable[[], Image.Image]:
        """How to get a PIL image from what a caller passed (files are read only then)."""
        import os

        if isinstance(image, Image.Image):
            return lambda: to_rgb(image)
        if isinstance(image, (bytes, bytearray)):
            return lambda: self._decode(bytes(image))
        if isinstance(image, (str, os.PathLike)):
            return lambda: self._decode(storage.read_bytes(os.fspath(image)))
        if type(image).__module__ == "numpy" and hasattr(image, "dtype"):
            return lambda: to_rgb(_from_array(image))
        raise InputError(f"cannot predict on a {type(image).__name__}: give PIL images, numpy arrays, paths or bytes")

    def predict_tensor(
        self, batch: torch.Tensor, *, top_k: int | None = None, threshold: Threshold | None = None
    ) -> list[Prediction]:
        """An already preprocessed batch (N, 3, S, S)."""
        size = self.meta.preprocess.input_size
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise InputError(f"expected a batch of shape (N, 3, {size}, {size}), got {list(batch.shape)}")
        k, thresholds = self.resolve_options(top_k, threshold)
        return self.postprocess(self.logits(batch), k, thresholds)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw model outputs (N, C), float32 on the CPU, run in chunks of batch_size."""
        if batch.shape[0] == 0:
            return torch.empty(0, self.meta.num_classes)
        chunks = [self._run(part) for part in batch.split(self.batch_size)]  # each (n, C)
        return torch.cat(chunks)  # (N, C)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) logits → (N, C) probabilities: softmax for single-label, sigmoid for multi."""
        return objective(self.meta.task).probabilities(logits)

    # --- the steps, for callers that run them apart (the batching server) ----------

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Encoded image → model input (3, S, S); UnreadableImageError when it is unusable."""
        return self._from_bytes(data)

    def resolve_options(self, top_k: int | None, threshold: Threshold | None) -> tuple[int, list[float] | None]:
        """Check per-call options before any work; InputError when they are bad."""
        return self._resolve_top_k(top_k), self._resolve_thresholds(threshold)

    def postprocess(self, logits: torch.Tensor, top_k: int, thresholds: list[float] | None) -> list[Prediction]:
        """(N, C) logits → one Prediction per row, with options from :meth:`resolve_options`."""
        probs = self.probabilities(logits.float())  # (N, C)
        # stable sort: equal probabilities keep class order, so top-k is deterministic
        order = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :top_k]  # (N, k)
        rows = zip(probs.tolist(), order.tolist(), strict=True)
        return [self._one(row, ranks, thresholds) for row, ranks in rows]

    # --- the shared path ---------------------------------------------------------

    def _predict(
        self, loaders: Sequence[Callable[[], torch.Tensor]], top_k: int | None, threshold: Threshold | None
    ) -> list[Prediction]:
        # Check per-call options before any work, so a bad option fails the request as a whole.
        k, thresholds = self.resolve_options(top_k, threshold)
        results: list[Prediction | None] = [None] * len(loaders)
        tensors: list[torch.Tensor] = []
        slots: list[int] = []
        for i, load in enumerate(loaders):
            try:
                tensors.append(load())  # (3, S, S)
                slots.append(i)
            except UnreadableImageError as exc:
                results[i] = Prediction(error=exc.message)
        if tensors:
            batch = torch.stack(tensors)  # (n, 3, S, S): one forward for the whole request
            predicted = self.postprocess(self.logits(batch), k, thresholds)
            for slot, prediction in zip(slots, predicted, strict=True):
                results[slot] = prediction
        return [r for r in results if r is not None]

    def _from_bytes(self, data: bytes) -> torch.Tensor:
        """Encoded image → model input (3, S, S): the fast path where it applies, else PIL's."""
        if self.array_transform is not None:
            pixels = decode_jpeg_upright(data, shrink_to=self._shrink_to)  # None: not for the fast path
            if pixels is not None:
                return self.array_transform(pixels)
        return self._from_image(lambda: self._decode(data))

    def _decode(self, data: bytes) -> Image.Image:
        return to_rgb(decode(data, shrink_to=self._shrink_to))

    def _from_image(self, load: Callable[[], Image.Image]) -> torch.Tensor:
        try:
            return self.transform(load())  # (3, S, S)
        except UnreadableImageError:
            raise
        except (OSError, ValueError, SyntaxError) as exc:  # e.g. broken EXIF met by to_rgb
            raise UnreadableImageError(f"corrupt image: {exc}") from exc

    def decide(self, probs: Sequence[float], thresholds: Sequence[float] | None = None) -> list[str]:
        """The labels an answer gives for one image's probabilities (class order): the most
        probable class (the first of equals), or every tag at or above its threshold
        (``thresholds``, else the bundle's)."""
        classes = self.meta.classes
        if self.meta.multilabel:
            limits = thresholds if thresholds is not None else list(self.meta.thresholds or ())
            return [c for c, p, t in zip(classes, probs, limits, strict=True) if p >= t]
        return [classes[max(range(len(probs)), key=probs.__getitem__)]]

    def _one(self, probs: list[float], ranks: list[int], thresholds: list[float] | None) -> Prediction:
        classes = self.meta.classes
        return Prediction(
            probabilities=probs,
            labels=self.decide(probs, thresholds),
            scores=dict(zip(classes, probs, strict=True)),
            top=[(classes[i], probs[i]) for i in ranks],
        )

    def _resolve_top_k(self, top_k: int | None) -> int:
        k = self.meta.default_top_k if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"top_k must be a positive integer, not {top_k!r}")
        return min(k, self.meta.num_classes)

    def _resolve_thresholds(self, threshold: Threshold | None) -> list[float] | None:
        """Per-class thresholds for this call; None means model.json's."""
        if threshold is None:
            return None
        try:
            if isinstance(threshold, (int, float)):
                values = [float(threshold)] * self.meta.num_classes
            else:
                values = [float(t) for t in threshold]
        except (TypeError, ValueError) as exc:
            raise InputError(f"threshold must be a number or one number per class, not {threshold!r}") from exc
        if len(values) != self.meta.num_classes:
            raise InputError(f"{len(values)} thresholds given for {self.meta.num_classes} classes")
        if not all(0.0 <= t <= 1.0 for t in values):
            raise InputError(f"thresholds must lie in [0, 1], got {threshold!r}")
        return values


def _from_array(array: Any) -> Image.Image:
    """(H, W) or (H, W, 3|4) pixels, uint8 or floats in [0, 1], as a PIL image."""
    import numpy as np

    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise UnreadableImageError(f"an image array is (H, W) or (H, W, 3 or 4), not {tuple(array.shape)}", reason="shape")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise UnreadableImageError(f"image arrays are uint8 or floats in [0, 1], not {array.dtype}", reason="dtype")
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


# --- backends: a preprocessed batch (n, 3, S, S) -> logits (n, C) ----------------


def _torch_runner(model: Any, device: str | torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"the torch backend needs a torch.nn.Module, not {type(model).__name__}")
    model = model.to(device).eval()
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(batch.to(device=device, dtype=dtype))  # (n, C)
        return logits.float().cpu()

    return run


def _onnx_runner(
    model: Any, meta: BundleMeta, intra_op_threads: int | None, device: torch.device, *, required: bool
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The forward function and the provider it runs on."""
    # onnx_export pulls in onnx/onnxruntime; import it only for this backend
    from tagmill.bundle.onnx_export import make_session, onnx_bytes, onnx_providers, run_session

    if isinstance(model, torch.nn.Module):
        model = onnx_bytes(model, meta)  # exported and verified in memory
    if isinstance(model, (bytes, bytearray)):
        session = make_session(bytes(model), intra_op_threads=intra_op_threads,
                               providers=onnx_providers(device, required=required))
    elif hasattr(model, "run") and hasattr(model, "get_inputs"):  # an onnxruntime.InferenceSession
        session = model
    else:
        raise InputError(
            f"the onnx backend needs ONNX bytes, an onnxruntime.InferenceSession or a torch module, "
            f"not {type(model).__name__}"
        )
    return (lambda batch: run_session(session, batch)), f"onnxruntime {session.get_providers()[0]}"


def _runs_int8(location: str, meta: BundleMeta, precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if precision == "int8" and meta.int8 is None:
        raise BundleError(f"bundle {location} has no INT8 graph ({INT8_FILE})",
                          hint="export it with `tagmill export RUN --out BUNDLE --int8`, or leave --precision out")
    return meta.int8 is not None and (precision == "int8" or device.type == "cpu")


def _read_onnx(location: str, meta: BundleMeta) -> bytes:
    path = storage.join(location, ONNX_FILE)
    if meta.onnx_sha256 is None or not storage.exists(path):
        raise BundleError(
            f"bundle {location} has no {ONNX_FILE}",
            hint="save it with onnx=True (tagmill export --onnx), or use the torch backend",
        )
    return read_checked(location, ONNX_FILE, meta.onnx_sha256)


def _decode_size(pre: Preprocess) -> int:
    """The smallest shorter side decoding may shrink a JPEG to without losing detail
    that the resize would keep (the crop method first resizes to size / crop_pct)."""
    if pre.resize_method == "crop":
        return max(pre.input_size, int(round(pre.input_size / pre.crop_pct)))
    return pre.input_size
