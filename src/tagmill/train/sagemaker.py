"""SageMaker image-classification hyperparameters, read as tagmill training options.

A job written for SageMaker's built-in algorithm (``num_layers``, ``epochs``,
``learning_rate``, ``mini_batch_size``, ``image_shape``, ``augmentation_type`` ...)
runs unchanged: each name maps onto a :class:`TrainConfig` field, counts are checked
against the dataset, and anything SageMaker-specific that has no meaning here is named
as ignored rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tagmill import storage
from tagmill.dataset.manifest import load_manifest
from tagmill.errors import InputError

SAGEMAKER_DEPTHS = (18, 34, 50, 101, 152, 200)
#: Where ImageNet weights for resnet{N} may be found, as resnet{N}.safetensors or .pth.
WEIGHTS_DIR_ENV = "TAGMILL_WEIGHTS_DIR"
#: Names SageMaker accepts that steer its own MXNet trainer and mean nothing here.
IGNORED = frozenset({
    "optimizer", "momentum", "beta_1", "beta_2", "eps", "gamma", "lr_scheduler_factor", "lr_scheduler_step",
    "checkpoint_frequency", "kv_store", "early_stopping_min_epochs", "early_stopping_tolerance",
    "resize", "multi_label", "use_weighted_loss", "label_width",
})
KNOWN = frozenset({
    "num_layers", "use_pretrained_model", "epochs", "learning_rate", "mini_batch_size", "image_shape",
    "augmentation_type", "top_k", "precision_dtype", "num_classes", "num_training_samples", "weight_decay",
    "early_stopping", "early_stopping_patience",
}) | IGNORED


def _int(params: dict[str, Any], name: str) -> int:
    try:
        return int(float(params[name]))
    except (TypeError, ValueError) as exc:
        raise InputError(f"hyperparameter {name} must be a whole number, got {params[name]!r}") from exc


def _float(params: dict[str, Any], name: str) -> float:
    try:
        return float(params[name])
    except (TypeError, ValueError) as exc:
        raise InputError(f"hyperparameter {name} must be a number, got {params[name]!r}") from exc


def _flag(params: dict[str, Any], name: str) -> bool:
    return str(params[name]).strip().lower() in {"1", "true", "yes"}


def local_resnet_weights(depth: int) -> Path | None:
    """A local ImageNet weights file for resnet{depth}, if the user has put one in place."""
    folders = [os.environ.get(WEIGHTS_DIR_ENV), str(Path.home() / ".cache" / "tagmill" / "weights")]
    for folder in filter(None, folders):
        for suffix in (".safetensors", ".pth", ".pt"):
            candidate = Path(folder) / f"resnet{depth}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def config_from_hyperparameters(location: str, dataset: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """TrainConfig fields from a SageMaker hyperparameters JSON file (values may be strings)."""
    try:
        params = json.loads(storage.read_text(location))
    except json.JSONDecodeError as exc:
        raise InputError(f"{location} is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise InputError(f"{location} must hold a JSON object of hyperparameters")
    unknown = sorted(set(params) - KNOWN)
    if unknown:
        raise InputError(f"unknown SageMaker hyperparameter(s): {', '.join(unknown)}")
    manifest = load_manifest(dataset)
    _check_counts(params, manifest)
    options: dict[str, Any] = {}
    pretrained = _flag(params, "use_pretrained_model") if "use_pretrained_model" in params else False
    options.update(_backbone(params, pretrained, log))
    if "epochs" in params:
        epochs = _int(params, "epochs")
        if epochs < 1:
            raise InputError("hyperparameter epochs must be >= 1")
        # SageMaker fine-tunes for `epochs` in total; spend a third on the cached-feature head stage
        frozen = math.ceil(epochs / 3) if pretrained and epochs > 1 else 0
        options["frozen_epochs"], options["unfrozen_epochs"] = frozen, epochs - frozen
    if "learning_rate" in params:
        options["lr"] = _float(params, "learning_rate")
    if "mini_batch_size" in params:
        options["batch_size"] = _int(params, "mini_batch_size")
    if "image_shape" in params:
        options["image_size"] = _image_size(str(params["image_shape"]))
    if "augmentation_type" in params:
        options["augmentation"] = str(params["augmentation_type"])
    if "top_k" in params:
        options["top_k"] = _int(params, "top_k")
    if "weight_decay" in params:
        options["weight_decay"] = _float(params, "weight_decay")
    if "precision_dtype" in params:
        options["precision"] = _precision(str(params["precision_dtype"]), log)
    if "early_stopping" in params and _flag(params, "early_stopping"):
        options["patience"] = _int(params, "early_stopping_patience") if "early_stopping_patience" in params else 5
    ignored = sorted(set(params) & IGNORED)
    if ignored:
        log(f"hyperparameters with no effect here (tagmill uses AdamW + one-cycle): {', '.join(ignored)}")
    return options


def _backbone(params: dict[str, Any], pretrained: bool, log: Callable[[str], None]) -> dict[str, Any]:
    if "num_layers" not in params:
        return {"pretrained": pretrained} if not pretrained else {}
    depth = _int(params, "num_layers")
    if depth not in SAGEMAKER_DEPTHS:
        raise InputError(f"num_layers must be one of {', '.join(map(str, SAGEMAKER_DEPTHS))}, got {depth}")
    if not pretrained:
        return {"backbone": f"resnet{depth}", "pretrained": False}
    weights = local_resnet_weights(depth)
    if weights is not None:
        log(f"num_layers={depth}: using resnet{depth} with ImageNet weights from {weights}")
        return {"backbone": f"resnet{depth}", "pretrained": True, "weights": str(weights)}
    # What was asked, or a clear stop: the weights come from the hub cache (models.pretrained),
    # and where they cannot be found training ends with that resolution error, never with
    # another architecture in its place.
    from tagmill.models import resolve_weights

    source = resolve_weights(f"resnet{depth}")
    log(f"num_layers={depth}: using resnet{depth} with ImageNet weights from {source.location}")
    return {"backbone": f"resnet{depth}", "pretrained": True}


def _image_size(shape: str) -> int:
    parts = [p.strip() for p in shape.split(",")]
    try:
        channels, height, width = (int(p) for p in parts)
    except ValueError as exc:
        raise InputError(f"image_shape must be 'channels,height,width' like '3,224,224', got {shape!r}") from exc
    if channels != 3 or height != width:
        raise InputError(f"image_shape {shape!r}: tagmill trains on square RGB inputs (3,N,N)")
    return height


def _precision(dtype: str, log: Callable[[str], None]) -> str:
    if dtype == "float32":
        return "fp32"
    if dtype == "float16":
        log("precision_dtype=float16: using bfloat16 autocast (same speed, no loss scaling needed)")
        return "bf16"
    raise InputError(f"precision_dtype must be float32 or float16, got {dtype!r}")


def _check_counts(params: dict[str, Any], manifest) -> None:
    if "num_classes" in params and _int(params, "num_classes") != len(manifest.classes):
        raise InputError(
            f"num_classes={_int(params, 'num_classes')} but the dataset has {len(manifest.classes)} classes"
        )
    if "num_training_samples" in params:
        expected, actual = _int(params, "num_training_samples"), manifest.split("train").count
        if expected != actual:
            raise InputError(f"num_training_samples={expected} but the dataset's train split has {actual} images")
