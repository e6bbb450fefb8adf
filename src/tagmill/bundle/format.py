"""The model bundle on disk: ``model.json`` + ``model.safetensors`` (+ ``model.onnx``).

A bundle is a directory (local path or fsspec URL). ``model.json`` says everything
needed to rebuild and use the model — architecture, classes, preprocessing,
thresholds — and the sha256 of the weights. Weights are safetensors, never a pickle,
so loading a bundle runs no code from it: the model is rebuilt from the timm
architecture name and only tensors are read from the file.

Writes are atomic per file and ``model.json`` is written last, so a bundle that was
interrupted half-way has no ``model.json`` and is refused as incomplete rather than
loaded with the wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

import safetensors
import safetensors.torch
import timm
import torch

import tagmill
from tagmill import storage
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import BundleError, InputError
from tagmill.models.levels import build

FORMAT = "tagmill.bundle"
SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
#: the ONNX graph quantized to INT8 (``tagmill export --int8``; see bundle/quantize.py)
INT8_FILE = "model.int8.onnx"
TASKS: tuple[str, ...] = ("single", "multi")
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class BundleMeta:
    """Everything in ``model.json``: how to rebuild the model and how to use it."""

    architecture: str  #: a timm model name, rebuilt with ``timm.create_model``
    task: str  #: "single" (softmax, one label) or "multi" (sigmoid, tags)
    classes: tuple[str, ...]
    preprocess: Preprocess = field(default_factory=Preprocess)
    #: multi-label: one threshold per class (default 0.5 each); single-label: None
    thresholds: tuple[float, ...] | None = None
    default_top_k: int = 5
    #: extra keyword arguments for ``timm.create_model`` (plain JSON values, e.g. a
    #: ViT's ``img_size``); ``num_classes`` always comes from ``classes``
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  #: the training config, free form
    metrics: dict[str, Any] = field(default_factory=dict)  #: final metrics, free form
    created: str = ""  #: ISO 8601 UTC; set by save_bundle
    weights_sha256: str = ""  #: filled by save_bundle
    onnx_sha256: str | None = None  #: filled by save_bundle(onnx=True)
    #: the INT8 graph's sha256 and how it compared with fp32 on the validation split
    #: (``bundle.quantize.add_int8``); None: no INT8 graph
    int8: dict[str, Any] | None = None
    tagmill_version: str = tagmill.__version__
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # Normalise containers so a meta built from lists or tuples compares equal.
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.thresholds is None and self.task == "multi":
            object.__setattr__(self, "thresholds", (DEFAULT_THRESHOLD,) * len(self.classes))
        elif self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        self._validate()

    def _validate(self) -> None:
        if self.task not in TASKS:
            raise InputError(f"unknown task {self.task!r}; choose {', '.join(TASKS)}")
        if not self.classes:
            raise InputError("a model needs at least one class")
        if not all(isinstance(c, str) and c for c in self.classes):
            raise InputError("class names must be non-empty strings")
        if len(set(self.classes)) != len(self.classes):
            raise InputError(f"duplicate class names in {list(self.classes)}")
        if not isinstance(self.architecture, str) or not self.architecture:
            raise InputError("architecture must be a timm model name")
        for name in ("model_kwargs", "training", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise InputError(f"{name} must be a mapping, not {type(getattr(self, name)).__name__}")
        if self.int8 is not None and not (isinstance(self.int8, dict) and isinstance(self.int8.get("sha256"), str)):
            raise InputError("int8 must be a mapping with the INT8 graph's sha256")
        if not isinstance(self.default_top_k, int) or self.default_top_k < 1:
            raise InputError(f"default_top_k must be a positive integer, not {self.default_top_k!r}")
        self._validate_thresholds()

    def _validate_thresholds(self) -> None:
        if self.task == "single":
            if self.thresholds is not None:
                raise InputError("thresholds apply to multi-label models only (task 'multi')")
            return
        thresholds = self.thresholds or ()  # filled with defaults in __post_init__
        if len(thresholds) != len(self.classes):
            raise InputError(f"{len(thresholds)} thresholds for {len(self.classes)} classes")
        bad = [t for t in thresholds if not 0.0 <= t <= 1.0]
        if bad:
            raise InputError(f"thresholds must lie in [0, 1], got {bad[0]}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.task == "multi"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, keys in a readable order."""
        return {
            "format": self.format,
            "schema_version": self.schema_version,
            "tagmill_version": self.tagmill_version,
            "created": self.created,
            "architecture": self.architecture,
            "model_kwargs": _jsonable(self.model_kwargs),
            "task": self.task,
            "classes": list(self.classes),
            "preprocess": _jsonable(self.preprocess.as_dict()),
            "thresholds": None if self.thresholds is None else list(self.thresholds),
            "default_top_k": self.default_top_k,
            "weights_sha256": self.weights_sha256,
            "onnx_sha256": self.onnx_sha256,
            "int8": None if self.int8 is None else _jsonable(self.int8),
            "training": _jsonable(self.training),
            "metrics": _jsonable(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleMeta:
        """Parse ``model.json``; anything wrong with it is a BundleError."""
        _check_format(data)
        known = {f.name for f in fields(cls)}
        # Unknown keys are ignored: a same-schema file from a later tagmill may add some.
        values = {k: v for k, v in data.items() if k in known}
        if not isinstance(values.get("classes"), list):
            raise BundleError("model.json is invalid: 'classes' must be a list of class names")
        if not isinstance(data.get("preprocess"), dict):
            # never fall back to defaults: serving must preprocess exactly as training did
            raise BundleError("model.json is invalid: 'preprocess' is missing")
        try:
            values["preprocess"] = Preprocess.from_dict(data["preprocess"])
            return cls(**values)
        except (InputError, TypeError, ValueError) as exc:
            raise BundleError(f"model.json is invalid: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _check_format(data: object) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"not a tagmill bundle: model.json has format {found!r}, expected {FORMAT!r}")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"model.json has no valid schema_version (got {version!r})")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"this bundle uses schema version {version}, newer than the {SCHEMA_VERSION} this "
            f"tagmill ({tagmill.__version__}) reads",
            hint=f"upgrade tagmill to the version that wrote it ({data.get('tagmill_version', 'unknown')})",
        )


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tuples become lists, tensor/numpy scalars become numbers, and
    NaN/inf become null (JSON has no NaN; an undefined metric is still worth saving)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InputError(f"cannot store {type(value).__name__} value {value!r} in model.json")


# --- weights ---------------------------------------------------------------------


def build_model(meta: BundleMeta) -> torch.nn.Module:
    """A fresh, randomly initialised model with the architecture and classes in ``meta``."""
    if not timm.is_model(meta.architecture):
        raise BundleError(
            f"unknown architecture {meta.architecture!r}: not a model in timm {timm.__version__}",
            hint="the bundle may need a newer timm",
        )
    kwargs = {k: v for k, v in meta.model_kwargs.items() if k not in ("num_classes", "pretrained")}
    try:
        return build(meta.architecture, meta.num_classes, kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BundleError(f"cannot build {meta.architecture!r} with {kwargs}: {exc}") from exc


def state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors can store it: one name per tensor.

    Parameters that are the same tensor (tied weights) keep only their first name; the
    others are filled back in on load because the rebuilt model ties them again.
    Tensors that merely overlap in memory are copied, since safetensors refuses shared
    storage.
    """
    state = model.state_dict()
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue  # an alias of a tensor already kept
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in storages:
            tensor = tensor.clone()  # overlaps another tensor without being it
        seen[key] = name
        storages.add(ptr)
        kept[name] = tensor.contiguous().cpu()
    return kept


def weights_bytes(model: torch.nn.Module) -> bytes:
    return safetensors.torch.save(state_tensors(model), metadata={"format": "pt"})


def _first_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str | None:
    """Describe the first tensor whose name or shape differs, in the model's order."""
    for name, tensor in expected.items():
        if name not in found:
            return f"tensor {name!r} {list(tensor.shape)} is missing from the weights"
        if tuple(found[name].shape) != tuple(tensor.shape):
            return f"tensor {name!r} has shape {list(found[name].shape)}, the model expects {list(tensor.shape)}"
    for name, tensor in found.items():
        if name not in expected:
            return f"tensor {name!r} {list(tensor.shape)} in the weights is not part of the model"
    return None


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy ``tensors`` into ``model``; names and shapes must match exactly."""
    problem = _first_mismatch(state_tensors(model), tensors)
    if problem:
        raise BundleError(
            f"weights in {source} do not fit the model described by model.json: {problem}",
            hint="model.json and model.safetensors come from different models",
        )
    # strict=False: tied aliases were not saved; the rebuilt model shares them already.
    model.load_state_dict(tensors, strict=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- save / load -----------------------------------------------------------------


def save_bundle(out: str, model: torch.nn.Module, meta: BundleMeta, *, onnx: bool = False) -> str:
    """Write ``model`` and ``meta`` as a bundle at ``out`` (path or URL); returns ``out``.

    The weights must fit ``meta`` (architecture + classes), so a bundle that cannot be
    loaded is never written. ``onnx=True`` also exports and verifies ``model.onnx``.
    """
    model = unwrap(model)
    check_fits(model, meta)
    storage.makedirs(out)
    # An older bundle here must not look complete, or pair its model.json or its
    # model.onnx with the new weights, while we write.
    storage.remove(storage.join(out, MODEL_JSON))
    storage.remove(storage.join(out, ONNX_FILE))
    storage.remove(storage.join(out, INT8_FILE))
    weights = weights_bytes(model)
    storage.write_bytes(storage.join(out, WEIGHTS_FILE), weights)
    onnx_sha: str | None = None
    if onnx:
        from tagmill.bundle.onnx_export import onnx_bytes  # heavy import, only when asked

        graph = onnx_bytes(model, meta)
        storage.write_bytes(storage.join(out, ONNX_FILE), graph)
        onnx_sha = sha256(graph)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    final = replace(meta, created=created, weights_sha256=sha256(weights), onnx_sha256=onnx_sha, int8=None,
                    tagmill_version=tagmill.__version__)
    storage.write_bytes(storage.join(out, MODEL_JSON), final.to_json().encode("utf-8"))
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain timm model inside DistributedDataParallel and/or torch.compile wrappers,
    whose state-dict names carry ``module.`` / ``_orig_mod.`` prefixes."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def check_fits(model: torch.nn.Module, meta: BundleMeta) -> None:
    """Refuse to save a model that load_bundle could not rebuild from ``meta``."""
    try:
        expected = state_tensors(build_model(meta))
    except BundleError as exc:
        raise InputError(str(exc.message), hint=exc.hint) from exc
    problem = _first_mismatch(expected, state_tensors(model))
    if problem:
        raise InputError(
            f"the model does not match architecture {meta.architecture!r} with "
            f"{meta.num_classes} classes: {problem}"
        )


def read_meta(location: str) -> BundleMeta:
    """Read and check ``model.json`` of the bundle at ``location``."""
    path = storage.join(location, MODEL_JSON)
    if not storage.exists(path):
        what = "it has no model.json" if storage.isdir(location) else "no such directory"
        raise BundleError(
            f"{location} is not a tagmill bundle: {what}",
            hint="a bundle is a directory with model.json and model.safetensors, written by tagmill",
        )
    text = storage.read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    return BundleMeta.from_dict(data)


def read_checked(location: str, name: str, expected_sha256: str) -> bytes:
    """Read one bundle file and check it against the sha256 recorded in model.json."""
    path = storage.join(location, name)
    if not storage.exists(path):
        raise BundleError(f"bundle {location} is incomplete: {name} is missing")
    data = storage.read_bytes(path)
    actual = sha256(data)
    if actual != expected_sha256:
        raise BundleError(
            f"{path} is corrupt or was replaced: its sha256 is {actual}, model.json records {expected_sha256}",
            hint="copy the bundle again, or re-export it",
        )
    return data


def _read_weights(location: str, meta: BundleMeta) -> dict[str, torch.Tensor]:
    """The bundle's tensors, checked against model.json's sha256 and parsed."""
    data = read_checked(location, WEIGHTS_FILE, meta.weights_sha256)
    try:
        return safetensors.torch.load(data)  # tensors only: no code runs
    except safetensors.SafetensorError as exc:
        raise BundleError(f"{storage.join(location, WEIGHTS_FILE)} is not a safetensors file: {exc}") from exc


def verify_bundle(location: str) -> BundleMeta:
    """Everything ``load_bundle`` checks about the files, without building the model:
    model.json, and weights that are whole (sha256) and readable. A server runs it
    before it binds its port, so a broken bundle fails as it does for ``predict``."""
    meta = read_meta(location)
    _read_weights(location, meta)
    return meta


def load_bundle(location: str, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, BundleMeta]:
    """Rebuild the model of the bundle at ``location``, in eval mode, on ``device``."""
    meta = read_meta(location)
    tensors = _read_weights(location, meta)
    model = build_model(meta)
    load_weights(model, tensors, source=storage.join(location, WEIGHTS_FILE))
    return model.to(device).eval(), meta
