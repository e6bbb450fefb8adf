"""The backbones a user can pick, what they cost, and whether their weights are here.

``tagmill backbones`` lists them so a user can trade accuracy for time knowingly:
parameters and forward FLOPs are counted without allocating a weight (the network is
built on the meta device; torch's FlopCounterMode counts a multiply-add as 2 FLOPs, as
``bench/train_speed.py`` does), and ``measure`` times real forward passes and training
steps on this machine.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch

from tagmill.errors import InputError
from tagmill.models import hub
from tagmill.models.pretrained import pretrained_config, weights_here
from tagmill.models.registry import ALIASES

#: what users name (the ResNet depths of SageMaker's num_layers, the networks people reach
#: for today), smallest first within each family; the Lite aliases are the ones whose weights ship
CATALOG: tuple[str, ...] = (
    *ALIASES,
    "mobilenetv3_large_100", "efficientnet_b0", "tf_efficientnetv2_s",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "convnext_tiny", "convnext_small",
    "vit_small_patch16_224", "vit_base_patch16_224",
)
#: images per timed batch; small, so the largest catalog entries finish a training step
#: in seconds on a 2-core CPU (ViT-B/16: 35 GFLOPs forward per image, ~0.4 TFLOP per
#: training step of 4 images)
MEASURE_BATCH = 4
#: timing stops after this long (and at least MEASURE_MIN_STEPS steps, after one warm-up)
MEASURE_SECONDS = 1.5
MEASURE_MIN_STEPS = 2


@dataclass(frozen=True)
class Backbone:
    name: str  #: what to pass to --backbone
    weights: str | None  #: "package" | "hub cache" | None (not on this machine)
    input_size: int  #: the weights' native square side
    params_m: float  #: millions of parameters (with a 1000-class head)
    gflops: float  #: one forward pass of one image at input_size
    infer_per_s: float | None = None  #: images/s, eval forward, batch MEASURE_BATCH (measure only)
    train_per_s: float | None = None  #: images/s, forward + backward + SGD step (measure only)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_names() -> list[str]:
    """The catalog, then whatever the hub cache holds (timm's repositories by their tagged name)."""
    names = list(CATALOG)
    for repo in hub.cached_repos():
        org, name = repo.split("/", 1)
        candidate = name if org == "timm" and timm.is_model(name) else f"hf-hub:{repo}"
        if candidate not in names:
            names.append(candidate)
    return names


def matching(pattern: str) -> list[str]:
    """timm's pretrained names matching the shell-style ``pattern`` (e.g. ``convnext_*``)."""
    found = [name for name in timm.list_pretrained() if fnmatch.fnmatch(name, pattern)]
    if not found:
        raise InputError(f"no pretrained timm model matches {pattern!r}", hint="e.g. 'resnet*' or 'convnext_tiny.*'")
    return found


def describe(name: str, *, measure: bool = False) -> Backbone:
    """One row of the list: counted on the meta device; timed for real with ``measure``."""
    here = weights_here(name)
    cfg = pretrained_config(name, pretrained=here is not None)  # local files only: nothing downloads
    size = cfg.input_size
    with torch.device("meta"):
        model = timm.create_model(cfg.architecture, pretrained=False).eval()
        images = torch.empty(1, 3, size, size)  # (B, 3, H, W)
    params = sum(p.numel() for p in model.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    row = Backbone(name, here, size, params / 1e6, counter.get_total_flops() / 1e9)
    if measure:
        infer, train = _measure(cfg.architecture, size)
        row = Backbone(**{**row.as_dict(), "infer_per_s": infer, "train_per_s": train})
    return row


def _measure(architecture: str, size: int) -> tuple[float, float]:
    """Images/s for inference and for a training step, random weights and images."""
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=10)
    images = torch.randn(MEASURE_BATCH, 3, size, size)  # (B, 3, H, W)
    labels = torch.randint(0, 10, (MEASURE_BATCH,))
    model.eval()
    with torch.inference_mode():
        infer = _rate(lambda: model(images))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return infer, _rate(step)


def _rate(work: Any) -> float:
    work()  # warm-up: allocations and kernel choices
    steps, start = 0, time.perf_counter()
    while steps < MEASURE_MIN_STEPS or time.perf_counter() - start < MEASURE_SECONDS:
        work()
        steps += 1
    return steps * MEASURE_BATCH / (time.perf_counter() - start)


__all__ = ["CATALOG", "Backbone", "default_names", "describe", "matching"]
