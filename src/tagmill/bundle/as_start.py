"""A bundle as the starting point of a new training run (SageMaker's incremental training).

Training sits upstream of bundles and never reads one itself: the command line reads the
bundle here and hands the run its weights and classes (``train.init_from``).
"""

from __future__ import annotations

from typing import Any

from tagmill.bundle.format import load_bundle, read_meta
from tagmill.models import pooling_of
from tagmill.train.init_from import StartingPoint


def training_settings(location: str) -> dict[str, Any]:
    """Training options implied by a bundle: its architecture, pooling and preprocessing
    (the head's rows are carried over, so its input must stay the same)."""
    meta = read_meta(location)
    return {
        "backbone": meta.architecture,
        "pooling": pooling_of(meta.model_kwargs),
        "image_size": meta.preprocess.input_size,
        "resize_method": meta.preprocess.resize_method,
    }


def starting_point(location: str) -> StartingPoint:
    model, meta = load_bundle(location)
    return StartingPoint(model.state_dict(), list(meta.classes), meta.architecture, pooling_of(meta.model_kwargs),
                         meta.preprocess)
