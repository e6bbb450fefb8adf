"""The typed configuration of a training run. It is saved in the run directory and
in the model bundle, so every model can say exactly how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tagmill.dataset.transforms import AUGMENTATIONS, RESIZE_METHODS
from tagmill.errors import InputError

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    #: a local weights file for the backbone (.safetensors or a state-dict .pth)
    weights: str | None = None
    #: a model bundle to start from (incremental training); classes are matched by name
    init_from: str | None = None
    #: None: the backbone's own input size (224 for Lite0)
    image_size: int | None = None
    resize_method: str = "squish"
    augmentation: str = "crop"
    batch_size: int = 64
    #: head-only epochs on cached backbone features (fastai's first fit_one_cycle)
    frozen_epochs: int = 3
    #: whole-network epochs with discriminative learning rates (after unfreeze())
    unfrozen_epochs: int = 2
    lr: float = 5e-3
    #: the unfrozen stage's head learning rate is lr * unfrozen_lr_scale ...
    unfrozen_lr_scale: float = 0.1
    #: ... and the earliest layers get that divided by lr_mult
    lr_mult: float = 10.0
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    #: multi-label: weight positives of rare tags up (BCE pos_weight = negatives/positives, capped)
    pos_weight: bool = False
    #: augmented views of each training image in the feature cache (1 = no augmentation)
    cache_views: int = 2
    precision: str = "fp32"
    channels_last: bool = True
    patience: int | None = None
    seed: int = 0
    workers: int | None = None
    device: str = "auto"
    #: local read-through cache for shards read from URLs (s3://...); None: no cache
    cache_dir: str | None = None
    cache_gb: float = 20.0
    #: multi-label: the threshold for accuracy_thresh / F-beta before tuning (seed 001 used 0.2)
    threshold: float = 0.2
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.resize_method not in RESIZE_METHODS:
            raise InputError(f"--resize must be one of {', '.join(RESIZE_METHODS)}, not {self.resize_method!r}")
        if self.augmentation not in AUGMENTATIONS:
            raise InputError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, not {self.augmentation!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.batch_size < 1 or self.frozen_epochs < 0 or self.unfrozen_epochs < 0:
            raise InputError("batch size must be >= 1 and epoch counts >= 0")
        if self.frozen_epochs + self.unfrozen_epochs == 0:
            raise InputError("nothing to train: both --frozen-epochs and --unfrozen-epochs are 0")
        if self.lr <= 0 or self.lr_mult < 1:
            raise InputError("--lr must be > 0 and --lr-mult >= 1")
        if self.cache_views < 1:
            raise InputError("--cache-views must be >= 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)
