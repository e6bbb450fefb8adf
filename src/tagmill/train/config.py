"""The typed configuration of a training run. It is saved in the run directory and
in the model bundle, so every model can say exactly how it was made."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from tagmill.dataset.transforms import AUGMENTATIONS, RESIZE_METHODS
from tagmill.errors import InputError

PRECISIONS = ("fp32", "bf16")
#: as ``models.POOLINGS`` (not imported from there: the config module stays free of timm)
POOLINGS = ("avg", "avgmax", "levels")


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    #: a local weights file for the backbone (.safetensors or a state-dict .pth)
    weights: str | None = None
    #: a model bundle to start from (incremental training); classes are matched by name
    init_from: str | None = None
    #: None: chosen from the data (see ``train.auto``): small images are not upsampled to
    #: the backbone's full size unless they carry that much detail
    image_size: int | None = None
    resize_method: str = "squish"
    #: how the feature maps become the head's input: "avg", "avgmax" or "levels" (see
    #: ``models.POOLINGS``). None: the richest the backbone allows
    #: (``models.default_pooling``: "levels" for CNNs whose intermediate outputs timm
    #: returns, "avgmax" for other CNNs, else "avg")
    pooling: str | None = None
    #: the augmented cache views and fine-tuning use it. None: "crop" for the cache; for
    #: fine-tuning, "crop" when the head's cross-validation found augmented views helped,
    #: else "none" (augmentation that hurts a linear head hurts fine-tuning too)
    augmentation: str | None = None
    batch_size: int = 64
    #: None: fit the head to convergence on the cached features (L-BFGS, L2 chosen by
    #: k-fold on train); N: N one-cycle epochs of the head instead (fastai's frozen fit);
    #: 0: no head stage
    frozen_epochs: int | None = None
    #: whole-network epochs after unfreezing. None: only within --time-budget, and only
    #: while validation improves; N: exactly N (fastai's fine_tune), unless --patience
    unfrozen_epochs: int | None = None
    #: seconds the whole run may take; the whole-network stage gets what is left after
    #: the head, and starts no epoch it cannot finish in time
    time_budget: float | None = None
    #: the head's one-cycle epochs; None: found by the learning-rate finder on the cached features
    lr: float | None = None
    #: the unfrozen stage's head learning rate is lr * unfrozen_lr_scale (5e-4 without --lr) ...
    unfrozen_lr_scale: float = 0.1
    #: ... and the earliest layers get that divided by lr_mult
    lr_mult: float = 10.0
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    #: multi-label: weight positives of rare tags up (BCE pos_weight = negatives/positives, capped)
    pos_weight: bool = False
    #: views of each training image in the feature cache (view 0 plain, the rest augmented);
    #: None: chosen from the input size (see ``train.auto``)
    cache_views: int | None = None
    #: k of the k-fold that chooses the head's L2 strength and gives out-of-fold predictions
    folds: int = 5
    precision: str = "fp32"
    channels_last: bool = True
    patience: int | None = None
    seed: int = 0
    workers: int | None = None
    device: str = "auto"
    #: local read-through cache for shards read from URLs (s3://...); None: no cache
    cache_dir: str | None = None
    cache_gb: float = 20.0
    #: multi-label: the threshold for accuracy_thresh / F-beta before tuning (0.2, as users' fastai movie-stills job)
    threshold: float = 0.2
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.resize_method not in RESIZE_METHODS:
            raise InputError(f"--resize must be one of {', '.join(RESIZE_METHODS)}, not {self.resize_method!r}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise InputError(f"--pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        if self.augmentation is not None and self.augmentation not in AUGMENTATIONS:
            raise InputError(f"--augmentation must be one of {', '.join(AUGMENTATIONS)}, not {self.augmentation!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.batch_size < 1 or (self.frozen_epochs or 0) < 0 or (self.unfrozen_epochs or 0) < 0:
            raise InputError("batch size must be >= 1 and epoch counts >= 0")
        if self.frozen_epochs == 0 and not self.unfrozen_epochs and self.time_budget is None:
            raise InputError(
                "nothing to train: no head stage (--frozen-epochs 0) and no whole-network epochs",
                hint="give --epochs N or --time-budget",
            )
        if (self.lr is not None and not self.lr > 0) or self.lr_mult < 1:
            raise InputError("--lr must be > 0 and --lr-mult >= 1")
        if self.cache_views is not None and self.cache_views < 1:
            raise InputError("--cache-views must be >= 1")
        if self.time_budget is not None and not self.time_budget > 0:
            raise InputError("--time-budget must be a positive duration")
        if self.folds < 2:
            raise InputError("--folds must be >= 2")

    @property
    def cache_augmentation(self) -> str:
        return self.augmentation or "crop"

    @property
    def model_pooling(self) -> str:
        """The pooling the run's model is built with. Training fills ``pooling`` in before
        it starts; a run saved before the option existed has none and pooled by average."""
        return self.pooling or "avg"

    @property
    def convex_head(self) -> bool:
        """The head is fitted to convergence (the default) rather than trained for epochs."""
        return self.frozen_epochs is None

    @property
    def head_epochs(self) -> int:
        """Epochs the head stage takes: one for the convex fit, else --frozen-epochs."""
        return 1 if self.frozen_epochs is None else self.frozen_epochs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)
