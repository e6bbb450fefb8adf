"""Build a classifier: a timm model with ``num_classes`` outputs, weights loaded by us.

A bundle rebuilds it with nothing but ``levels.build(architecture, N, model_kwargs)``
(``timm.create_model`` with ``pretrained=False``, plus multi-level pooling where the
kwargs ask for it) and ``load_state_dict``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import timm
import torch
from torch import nn

from tagmill.errors import InputError
from tagmill.models.levels import LEVELS_KEY, build, levels_for
from tagmill.models.pretrained import load_pretrained_weights, resolve_weights
from tagmill.models.registry import resolve_architecture
from tagmill.models.weights import LoadReport

log = logging.getLogger(__name__)

#: How the backbone's feature map becomes the head's input. "avg": the backbone's own
#: pooling (global average for CNNs, as timm builds them). "avgmax": global average and
#: global max concatenated (fastai's head), twice the features: the max keeps thin
#: strokes and small objects that an average over the whole map dilutes. On the dev sets
#: of ``bench/quality.py`` the converged head on avg+max features beat average pooling
#: on all three (mAP +2.7 on outline drawings, accuracy +2.0 and +0.5). "levels": avg+max
#: of the final map and of the last intermediate outputs, concatenated (``levels.py``).
POOLINGS: tuple[str, ...] = ("avg", "avgmax", "levels")


def pooling_kwargs(architecture: str, pooling: str) -> dict[str, Any]:
    """The model keyword arguments (``levels.build``'s) for ``pooling``; InputError where it cannot apply."""
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; choose {', '.join(POOLINGS)}")
    if pooling == "avg":
        return {}
    if not supports_avgmax(architecture):
        raise InputError(f"{architecture} has no feature map to max-pool (pooling {pooling} is for CNN backbones)",
                         hint="use pooling avg")
    if pooling == "avgmax":
        return {"global_pool": "catavgmax"}
    chosen = levels_for(resolve_architecture(architecture))
    if chosen is None:
        raise InputError(f"timm cannot return the intermediate outputs of {architecture} (pooling levels)",
                         hint="use pooling avgmax")
    return {"global_pool": "catavgmax", LEVELS_KEY: chosen}


def default_pooling(architecture: str) -> str:
    """The richest pooling ``architecture`` supports: levels, else avgmax, else avg."""
    if not supports_avgmax(architecture):
        return "avg"
    return "levels" if levels_for(resolve_architecture(architecture)) is not None else "avgmax"


def pooling_of(model_kwargs: dict[str, object]) -> str:
    """The pooling a bundle's ``model_kwargs`` build (the inverse of ``pooling_kwargs``)."""
    if LEVELS_KEY in model_kwargs:
        return "levels"
    return "avgmax" if model_kwargs.get("global_pool") == "catavgmax" else "avg"


@functools.cache  # asked when settings are chosen, and again by every model built with avgmax
def supports_avgmax(architecture: str) -> bool:
    """Whether timm builds ``architecture`` with concatenated avg+max pooling (CNNs do;
    ViTs pool tokens and refuse it). Built on the meta device: no weights allocated."""
    from timm.layers import SelectAdaptivePool2d

    try:
        with torch.device("meta"):
            model = timm.create_model(resolve_architecture(architecture), pretrained=False, num_classes=2,
                                      global_pool="catavgmax")
    except Exception:  # noqa: BLE001 - any refusal (assertion, TypeError, ...) means no
        return False
    pool = getattr(model, "global_pool", None)
    return isinstance(pool, SelectAdaptivePool2d) and pool.pool_type == "catavgmax"


def create_classifier(
    architecture: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    drop_rate: float = 0.0,
    pooling: str = "avg",
) -> nn.Module:
    """A timm ``architecture`` (or tagmill alias) with a fresh ``num_classes`` head.

    ``pooling`` is how the feature map becomes the head's input (see ``POOLINGS``).

    ``weights`` (a .safetensors or state-dict file) wins over ``pretrained``; without
    it, ``pretrained=True`` loads the weights ``pretrained.resolve_weights`` finds (a
    package's, or timm's from the Hugging Face hub cache), and is a
    WeightsNotFoundError where there are none. The backbone's head is loaded only when
    its shape matches ``num_classes``; which keys were kept fresh is logged.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be a positive integer, not {num_classes!r}")
    if not 0.0 <= drop_rate < 1.0:
        raise InputError(f"drop_rate must be in [0, 1), not {drop_rate!r}")
    name = resolve_architecture(architecture)
    if weights is None and pretrained:
        resolve_weights(architecture)  # fail before spending time on building the model

    # Only pass drop_rate when asked: a few exotic timm models take no such argument.
    options = {"drop_rate": drop_rate} if drop_rate else {}
    # pretrained=False always (in build): the weights are found and checked by us (pretrained.py).
    model = build(name, num_classes, pooling_kwargs(architecture, pooling), **options)

    _small_head_init(model)
    report: LoadReport | None = None
    if weights is not None or pretrained:
        report = load_pretrained_weights(model, architecture, weights)
    if report is not None:
        _log_report(report, name, num_classes)
    return model


def _small_head_init(model: nn.Module) -> None:
    """Start the classifier at zero, as transfer-learning practice does.

    timm's EfficientNet init draws the head from U(±1/sqrt(num_classes)): with 1280
    features that gives logits with a std of ~5 and a first-epoch loss near 6 for 10
    classes. A zero head starts at the uniform prediction (loss ln C) and learns from
    there; the backbone's features break the symmetry.
    """
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def check_image_size(architecture: str, image_size: int) -> None:
    """InputError unless ``architecture`` can classify ``image_size`` x ``image_size`` images.

    Asks the network itself: one forward pass on the meta device (shapes only, no
    weights allocated, a fraction of a second), so fixed-size ViTs, window sizes and
    too-deep downsampling are all caught with the network's own words.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise InputError(f"image size must be a positive integer, not {image_size!r}")
    name = resolve_architecture(architecture)
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=2).eval()
            images = torch.empty(1, 3, image_size, image_size)  # (B, 3, H, W)
    except Exception:  # noqa: BLE001 - a model whose init needs real tensors
        model = timm.create_model(name, pretrained=False, num_classes=2).eval()
        images = torch.zeros(1, 3, image_size, image_size)
    try:
        with torch.no_grad():
            model(images)
    except NotImplementedError:
        return  # an op with no meta kernel: cannot tell, so let training find out
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise InputError(
            f"{architecture} cannot classify {image_size}x{image_size} images: {_first_line(exc)}",
            hint=f"its native size is {_native_size(name)}",
        ) from exc


def _native_size(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    return f"{cfg.input_size[-1]}px" if cfg is not None else "224px"


def _log_report(report: LoadReport, name: str, num_classes: int) -> None:
    how = "paired by order" if report.by_order else "paired by name"
    log.info("%s: loaded %d tensors from %s (%s)", name, report.loaded, report.source, how)
    if report.skipped:
        log.info("%s: new %d-class head, not loaded: %s", name, num_classes, ", ".join(report.skipped))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "POOLINGS", "check_image_size", "create_classifier", "default_pooling", "pooling_kwargs", "pooling_of",
    "supports_avgmax",
]
