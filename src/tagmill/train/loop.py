"""``tagmill train``: transfer learning, the best model per CPU-second.

    choices        : input size and cached views from the data (``train.auto``), when
                     not given
    head stage     : backbone features cached once; by default the head is fitted to
                     convergence on them (``train.head_fit``: L-BFGS, L2 chosen by k-fold
                     on train, out-of-fold predictions kept for threshold tuning); with
                     --frozen-epochs N, N one-cycle epochs as fastai does instead
    unfrozen stage : the whole network, discriminative learning rates, one-cycle; only
                     when asked (--epochs N) or within --time-budget, and then only
                     while validation improves. The head-only model is an epoch like any
                     other, so the model kept is never worse than it.

After every epoch: one line of metrics (``metrics.jsonl``), ``last.pt`` (everything
needed to resume), and ``best.pt`` when the selection metric improved (accuracy, or
mAP for tags). Each epoch seeds its own randomness from (seed, epoch), so a run
resumed after a kill ends where an uninterrupted run would. The run directory's
layout is ``train.run_format``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from tagmill import storage
from tagmill.dataset.manifest import Manifest, load_manifest, verify_shards
from tagmill.dataset.shard_cache import ShardCache
from tagmill.dataset.torch_data import ShardDataset, default_workers, shard_loader
from tagmill.dataset.transforms import Preprocess, eval_transform, train_transform
from tagmill.errors import CheckpointError, DatasetError, InputError
from tagmill.objective import Objective, objective
from tagmill.progress import SILENT, Progress
from tagmill.train import distributed
from tagmill.train.checkpoint import load_checkpoint, save_checkpoint
from tagmill.train.config import TrainConfig
from tagmill.train.device import autocast, inference_chunk, resolve_device, run_chunked
from tagmill.train.features import (
    FeatureSet, extract_features, load_features, save_features, spool_features, write_spooled,
)
from tagmill.train.init_from import StartingPoint, transfer_weights
from tagmill.train.rows import Rows
from tagmill.train.run_format import (
    BEST, CONFIG, FEATURES, LAST, read_final_metrics, read_oof, read_run, report_files, write_history, write_oof, write_run,
)
from tagmill.train.tracking import Tracker, Tracking

if TYPE_CHECKING:  # the models package is imported lazily: the command line starts without it
    from tagmill.models.pretrained import PretrainedConfig
    from tagmill.train.head_fit import Population

#: a whole-network training step costs about this many forward passes (forward,
#: backward through every layer, optimizer): 62 img/s caching vs 16 img/s training for
#: Lite0 on 2 cores (bench/README.md); used to plan epochs within --time-budget
TRAIN_STEP_COST = 4.0
#: the whole network's peak learning rate (head; earlier layers lr_mult times less) when
#: --lr is not given: fastai's fine_tune after unfreezing uses 1e-3; 5e-4 is the rate
#: tagmill fine-tuned at before the finder existed. The finder sweeps only the head on
#: cached features; a whole-network sweep would cost ~100 training steps, minutes on a CPU.
UNFROZEN_LR = 5e-4


@dataclass
class TrainResult:
    run_dir: str
    history: list[dict[str, Any]]
    best_metric: float
    metric_name: str


@dataclass
class _State:
    """What a checkpoint restores."""

    epoch: int = 0  #: epochs completed, over both stages
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float = -math.inf
    bad_epochs: int = 0
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    #: seconds of work done so far (feature caching included), for --time-budget
    elapsed: float = 0.0
    #: whole-network epochs planned when that stage began (None: not begun)
    unfrozen_planned: int | None = None


def preprocess_for(config: TrainConfig, start: StartingPoint | None = None) -> Preprocess:
    """How this run feeds its model: as the weights it starts from were trained (a
    bundle's own preprocessing for ``start``; else the pretrained weights' or file's)."""
    if start is not None and start.preprocess is not None:
        return dataclasses.replace(start.preprocess, input_size=config.image_size or start.preprocess.input_size,
                                   resize_method=config.resize_method)
    cfg = _weights_config(config)
    return Preprocess(
        input_size=config.image_size or cfg.input_size,
        resize_method=config.resize_method,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
    )


def _weights_config(config: TrainConfig) -> PretrainedConfig:
    """The preprocessing of the weights a fresh run starts from (a run from a bundle takes
    the bundle's: ``preprocess_for``)."""
    from tagmill.models import pretrained_config

    return pretrained_config(config.backbone, pretrained=config.pretrained and config.init_from is None,
                             weights=config.weights)


def train(
    dataset: str | None,
    run_dir: str,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    load_start: Callable[[str], StartingPoint] | None = None,
    progress: Progress = SILENT,
    log: Callable[[str], None] = lambda line: None,
    trackers: Sequence[Tracker] = (),
) -> TrainResult:
    """Train on ``dataset`` into ``run_dir``; with ``resume``, continue the run there
    (its dataset and configuration come from the run directory). ``load_start`` reads
    the bundle named by ``config.init_from`` (the caller knows bundles; training does
    not). ``trackers`` (``train.tracking``) follow the run from rank 0. Under torchrun
    every rank calls this; only rank 0 writes."""
    if resume:
        dataset, config = read_run(run_dir)
    elif dataset is None:
        raise InputError("a dataset is needed to start a training run")
    config = config or TrainConfig()
    manifest = load_manifest(dataset)
    verify_shards(dataset, manifest)
    _check_dataset(manifest)
    ctx, device_name = distributed.start(config.device)
    try:
        if not ctx.is_main:
            progress, log = SILENT, (lambda line: None)  # one set of bars and epoch lines per job
        if load_start is not None:
            load_start = functools.cache(load_start)  # read once: settings and weights both come from it
        config = choose_open_settings(dataset, manifest, config, log, load_start)
        tracking = Tracking(trackers if ctx.is_main else (), log)
        return _train(dataset, run_dir, config, manifest, ctx, resolve_device(device_name), resume, load_start, progress, log,
                      tracking)
    finally:
        distributed.stop()


def choose_open_settings(
    dataset: str, manifest: Manifest, config: TrainConfig, log: Callable[[str], None],
    load_start: Callable[[str], StartingPoint] | None = None,
) -> TrainConfig:
    """Fill in the input size, cached views and pooling when the user left them open."""
    from tagmill.models import default_pooling
    from tagmill.train.auto import choose_cache_views, choose_input_size, typical_shorter_side

    weights_cfg = _weights_config(config)
    native = weights_cfg.input_size
    chosen: dict[str, Any] = {}
    if config.image_size is None and weights_cfg.fixed_input_size:  # a ViT with fixed position embeddings
        chosen["image_size"] = native
        log(f"input size: {native} px, the only size {config.backbone} takes")
    elif config.image_size is None:
        size = choose_input_size(native, typical_shorter_side(dataset, manifest))
        chosen["image_size"] = size.value
        log(f"input size: {size.reason}")
    if config.cache_views is None:
        views = choose_cache_views(native, chosen.get("image_size", config.image_size))
        chosen["cache_views"] = views.value
        if config.head_epochs > 0:
            log(f"feature cache: {views.reason}")
    if config.pooling is None:
        if config.init_from is not None and load_start is not None:
            chosen["pooling"] = load_start(config.init_from).pooling  # its head rows are carried over
        else:
            chosen["pooling"] = default_pooling(config.backbone)
            how = {
                "levels": "average and max of the final feature map and of the last blocks' outputs",
                "avgmax": "average and max side by side (fastai's head)",
                "avg": "the backbone's own",
            }[chosen["pooling"]]
            log(f"pooling: {how} (--pooling overrides)")
    return dataclasses.replace(config, **chosen) if chosen else config


def _train(dataset, run_dir, config, manifest, ctx, device, resume, load_start, progress, log, tracking) -> TrainResult:
    from tagmill.models import check_image_size, create_classifier

    start = load_start(config.init_from) if config.init_from is not None and load_start is not None else None
    preprocess = preprocess_for(config, start)
    check_image_size(config.backbone, preprocess.input_size)

    state = _State()
    checkpoint: dict[str, Any] | None = None
    if resume and storage.exists(storage.join(run_dir, LAST)):
        checkpoint = load_checkpoint(storage.join(run_dir, LAST))
        _check_checkpoint(checkpoint, manifest)
        state = _State(
            checkpoint["epoch"], checkpoint["history"], checkpoint["best_metric"], checkpoint["bad_epochs"],
            checkpoint["optimizer"], checkpoint["scheduler"], checkpoint.get("elapsed", 0.0),
            checkpoint.get("unfrozen_planned"),
        )
    # else: killed before its first epoch ended; start over in the same directory

    torch.manual_seed(config.seed)
    fresh = checkpoint is None and config.init_from is None
    model = create_classifier(
        config.backbone, len(manifest.classes), pretrained=config.pretrained and fresh,
        weights=config.weights if fresh else None, pooling=config.model_pooling,
    )
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif config.init_from is not None:
        if load_start is None:
            raise InputError(f"this run starts from {config.init_from}, but no bundle reader was given to train()")
        transfer = transfer_weights(model, load_start(config.init_from), manifest.classes)
        refit = " (the head is then fitted afresh on the new data)" if config.convex_head else ""
        log(f"starting from {config.init_from}: {transfer.describe()}{refit}")
    if not resume:  # only now: weights that cannot be found or do not fit leave no run directory behind
        _start_run_dir(run_dir, dataset, config, ctx)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    tracking.start({"dataset": dataset, **config.as_dict()})
    run = _Run(dataset, run_dir, manifest, config, preprocess, model, device, state, progress, log, ctx, tracking)
    if state.epoch < config.head_epochs and not run.stopped_early():
        run.head_stage()
    if not run.stopped_early():
        run.unfrozen_stage()
    if ctx.is_main:
        # the other ranks may exit meanwhile: torchrun waits for all, and no collective
        # remains that could time out while rank 0 evaluates a large validation split
        run.final_report()
        tracking.finish(read_final_metrics(run_dir, {}), report_files(run_dir))
    return TrainResult(run_dir, state.history, state.best_metric, run.objective.selection_metric)


def _check_dataset(manifest: Manifest) -> None:
    if "train" not in manifest.splits or manifest.splits["train"].count == 0:
        raise DatasetError("the dataset has no training images")
    if "val" not in manifest.splits or manifest.splits["val"].count == 0:
        raise DatasetError(
            "the dataset has no validation split: training needs one to pick the best epoch",
            hint="re-import with --val-fraction 0.1",
        )


def _check_checkpoint(checkpoint: dict[str, Any], manifest: Manifest) -> None:
    if checkpoint.get("classes") != manifest.classes:
        raise CheckpointError("the checkpoint was trained on other classes than this dataset has")


def _start_run_dir(run_dir: str, dataset: str, config: TrainConfig, ctx: distributed.DistContext) -> None:
    taken = storage.exists(storage.join(run_dir, CONFIG))
    distributed.barrier(ctx)  # every rank looks before rank 0 writes
    if taken:
        raise InputError(f"{run_dir} already holds a training run", hint="resume it with `tagmill train --resume`, or choose another --out")
    if ctx.is_main:
        storage.makedirs(run_dir)
        write_run(run_dir, dataset, config)


def _keep_batchnorm_statistics(model: torch.nn.Module) -> None:
    """Normalise with the running statistics while fine-tuning (BN affine weights still learn).

    The head was trained on features computed with the backbone's running statistics.
    Switching BatchNorm to batch statistics at unfreeze time shifts every feature at
    once (badly so on data unlike ImageNet, e.g. greyscale product shots) and the first
    unfrozen epoch spends itself undoing the damage; small CPU batches make batch
    statistics noisy besides.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


#: rows per chunk when the head's loss is taken over the whole training cache (``mean_loss``)
LOSS_ROWS = 16_384


def mean_loss(loss_fn: torch.nn.Module, classifier: torch.nn.Module, features: torch.Tensor, targets: torch.Tensor,
              device: torch.device, rows: int = LOSS_ROWS) -> float:
    """``loss_fn`` (a mean over rows) of ``classifier`` over every row of ``features``,
    ``rows`` rows at a time. In one call the (N, C) logits and the loss's temporaries of
    their size were each another copy of the training set's size beside the
    memory-mapped cache: 225,000 rows x 183 tags (scale_data's 250k set) took 471 MB of
    anonymous memory in one call, 11 MB in chunks of 16,384 (a /tmp measurement).
    One chunk (N <= ``rows``) gives the one call's number exactly; more, the same up to
    float rounding."""
    parts = []
    for start in range(0, len(features), rows):
        logits = classifier(features[start:start + rows].to(device))  # (n, C)
        parts.append((loss_fn(logits, targets[start:start + rows].to(device)).item(), len(logits)))
    if len(parts) == 1:
        return parts[0][0]
    return sum(loss * count for loss, count in parts) / max(1, sum(count for _, count in parts))


def _return_freed_memory() -> None:
    """Hand memory the allocator keeps after large frees back to the OS (glibc's
    ``malloc_trim``; a no-op elsewhere). The head fit frees hundreds of MB that glibc
    keeps mapped; data-loader workers forked afterwards start as copies of this process
    and carry those pages too. Measured by bench/scale_data.py's 50k set: the
    whole-network epoch's peak PSS 2,084 -> 1,557 MB."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        pass


class _Run:
    """One training run's moving parts, shared by its two stages."""

    def __init__(self, dataset, run_dir, manifest, config, preprocess, model, device, state, progress, log, ctx,
                 tracking: Tracking | None = None) -> None:
        self.dataset, self.run_dir, self.manifest, self.config = dataset, run_dir, manifest, config
        self.preprocess, self.model, self.device, self.state = preprocess, model, device, state
        self.progress, self.log, self.ctx = progress, log, ctx
        self.tracking = tracking or Tracking()
        #: per-rank batch: the configured batch size is the global one
        self.batch_size = max(1, config.batch_size // ctx.world)
        self.cache = ShardCache(config.cache_dir, int(config.cache_gb * 1e9)) if config.cache_dir else None
        self.objective: Objective = objective(manifest.task)
        self.loss_fn = self._loss()
        #: when this process started counting; state.elapsed carries earlier sessions' work
        self.clock = time.perf_counter() - state.elapsed
        #: backbone images/s measured while caching features (plans --time-budget epochs)
        self.forward_rate: float | None = None
        self._cache: tuple[list[FeatureSet], FeatureSet] | None = None

    # ---------------------------------------------------------------- shared pieces

    def _loss(self) -> torch.nn.Module:
        pos_weight = None
        if not self.objective.single and self.config.pos_weight:
            train = self.manifest.split("train")
            positives = torch.tensor([max(train.class_counts[c], 1) for c in self.manifest.classes], dtype=torch.float32)
            # negatives / positives, capped so a tag seen twice does not dominate the loss
            pos_weight = ((train.count - positives) / positives).clamp(1.0, 50.0).to(self.device)
        return self.objective.loss_module(label_smoothing=self.config.label_smoothing, pos_weight=pos_weight)

    def _loader(self, split: str, transform, *, shuffle: bool, epoch: int = 0, across_ranks: bool = True) -> DataLoader:
        data = ShardDataset(self.dataset, split, transform, manifest=self.manifest, shuffle=shuffle, seed=self.config.seed,
                            cache=self.cache, across_ranks=across_ranks)
        data.set_epoch(epoch)
        workers = self.config.workers if self.config.workers is not None else default_workers(self._share(split))
        return shard_loader(data, batch_size=self.batch_size, workers=workers, pin_memory=self.device.type == "cuda")

    def _steps(self, split: str) -> int:
        return math.ceil(self.manifest.split(split).count / self.ctx.world / self.batch_size)

    def stopped_early(self) -> bool:
        """--patience N: N epochs without improvement. Left open, a run that decides its
        own fine-tuning stops at the first whole-network epoch that does not pay; exact
        epoch counts (fastai's schedule) run to the end."""
        if self.config.patience is not None:
            return self.state.bad_epochs >= self.config.patience
        if self.config.unfrozen_epochs is None and self.state.history:
            last = self.state.history[-1]
            return last["stage"] == "unfrozen" and not last.get("improved", True)
        return False

    def learning_rate(self) -> float:
        """--lr, or the learning-rate finder's suggestion on the cached features (found
        once, then saved in the run's config so a resumed run uses the same)."""
        if self.config.lr is not None:
            return self.config.lr
        from tagmill.models import head
        from tagmill.train.lr_find import DEFAULT_LR, sweep_head

        if self.config.head_epochs == 0:
            lr, message = DEFAULT_LR, f"no cached features to sweep; using the default {DEFAULT_LR:.1e}"
        else:
            views, _ = self._feature_cache()
            sweep = sweep_head(views[0].features, views[0].targets, task=self.manifest.task, head=head(self.model),
                               batch_size=self.config.batch_size, seed=self.config.seed, device=self.device)
            lr, message = sweep.suggestion, f"{sweep.suggestion:.1e} ({sweep.method}). {sweep.message}".strip()
        self.log(f"learning rate: {message} (--lr overrides)")
        self.config = dataclasses.replace(self.config, lr=lr)
        if self.ctx.is_main:
            write_run(self.run_dir, self.dataset, self.config)
        return lr

    def _end_epoch(self, stage: str, train_loss: float, val_loss: float, probs, targets, seconds: float, images: int,
                   optimizer, scheduler, data_fingerprint: int | None = None,
                   read_bytes: list[int] | None = None) -> None:
        # Only the metric that picks the best epoch, each epoch: the full set (per-tag tables,
        # ROC-AUC, plots) is the final report's, once (for 25k images x 183 tags it costs
        # seconds, every epoch, growing with the data).
        name = self.objective.selection_metric
        value = float(self.objective.selection_score(probs, targets))
        state = self.state
        state.epoch += 1
        state.elapsed = time.perf_counter() - self.clock
        row = {
            "epoch": state.epoch, "stage": stage, "train_loss": train_loss, "val_loss": val_loss,
            "metric": name, "val_metric": value,
            "images_per_s": round(images / max(seconds, 1e-9), 1), "seconds": round(seconds, 2),
            "train_images": images,
        }
        if data_fingerprint is not None:
            # sum of CRC32s of the sample keys trained on: equal across runs exactly when
            # every sample was seen once, whatever the number of ranks and workers
            row["train_fingerprint"] = data_fingerprint
        if read_bytes is not None:
            # shard bytes each rank read for the epoch: the data once in all (± a shard per reader)
            row["train_read_bytes"] = read_bytes
        improved = value > state.best_metric
        row["improved"] = improved
        state.history.append(row)
        state.best_metric = max(state.best_metric, value)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        state.optimizer = optimizer.state_dict() if optimizer is not None else None
        state.scheduler = scheduler.state_dict() if scheduler is not None else None
        self.log(
            f"epoch {state.epoch:>3} {stage:<8} train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
            f"{name} {value:.4f}{'  *' if improved else ''}  {row['images_per_s']:.0f} img/s"
        )
        if not self.ctx.is_main:
            return
        checkpoint = {
            "epoch": state.epoch, "stage": stage, "classes": self.manifest.classes, "task": self.manifest.task,
            "preprocess": self.preprocess.as_dict(), "config": self.config.as_dict(), "dataset": self.dataset,
            "model": self.model.state_dict(), "optimizer": state.optimizer, "scheduler": state.scheduler,
            "history": state.history, "best_metric": state.best_metric, "bad_epochs": state.bad_epochs,
            "elapsed": state.elapsed, "unfrozen_planned": state.unfrozen_planned,
        }
        if improved:
            save_checkpoint(storage.join(self.run_dir, BEST), {**checkpoint, "metrics": {"headline": {name: value}}})
        save_checkpoint(storage.join(self.run_dir, LAST), checkpoint)
        write_history(self.run_dir, state.history)
        self.tracking.log_epoch(state.epoch, row)

    # ---------------------------------------------------------------- frozen stage

    def _feature_cache(self) -> tuple[list[FeatureSet], FeatureSet]:
        """The cached features of every training view and of validation: computed once
        (all ranks together) into the run directory, and memory-mapped from there where it
        is a local file (else kept in memory)."""
        if self._cache is not None:
            return self._cache
        location = storage.join(self.run_dir, FEATURES)
        if storage.exists(location):
            views, val = load_features(location)
            if len(views) == self.config.cache_views and val is not None:
                self._cache = views, val
                return self._cache
        config = self.config
        extract = dict(device=self.device, precision=config.precision, channels_last=config.channels_last, progress=self.progress)
        # one process, a local file: each pass goes to disk as it is computed and the cache
        # file is written from there (``spool_features``), never held in memory; ranks
        # gather theirs in memory
        spooled = not self.ctx.enabled and storage.is_local(location)

        def features(loader: DataLoader, description: str, total: int, name: str):
            if spooled:
                return spool_features(self.model, loader, f"{location.removeprefix('file://')}.{name}",
                                      description=description, total=total, **extract)
            return self._merged(extract_features(self.model, loader, description=description, total=total, **extract))

        start = time.perf_counter()
        views = []
        try:
            for view in range(config.cache_views):
                transform = eval_transform(self.preprocess) if view == 0 and self._plain_first_view else train_transform(self.preprocess, config.cache_augmentation)
                torch.manual_seed(config.seed * 7919 + view)
                loader = self._loader("train", transform, shuffle=False)
                views.append(features(loader, f"caching features (view {view + 1}/{config.cache_views})", self._share("train"),
                                      f"train{view}"))
            val = features(self._loader("val", eval_transform(self.preprocess), shuffle=False), "caching validation features",
                           self._share("val"), "val")
        except BaseException:
            for spool in views if spooled else ():
                spool.remove()
            raise
        images = len(val.keys) + sum(len(v.keys) for v in views)
        self.forward_rate = images / self.ctx.world / max(time.perf_counter() - start, 1e-9)
        if spooled:
            write_spooled(location.removeprefix("file://"), views, val)
        elif self.ctx.is_main:
            save_features(location, views, val)
        if self.ctx.is_main and storage.is_local(location):
            # the file's pages: instead of a second copy in RAM, or (spooled) of the spools
            views, val = load_features(location)
        self._cache = views, val
        return self._cache

    @property
    def _plain_first_view(self) -> bool:
        """Whether cached view 0 is the unaugmented image.

        The converged head is cross-validated on view 0 (held-out images are judged as
        they will be at prediction time), so for it view 0 is always plain: a lone
        augmented view cost 4 mAP points on an outline-drawing tag set. One-cycle head
        epochs over a single cached view keep it augmented, as fastai's frozen epochs
        see augmented images; with more views, view 0 is plain and the rest augmented.
        """
        return self.config.convex_head or self.config.cache_views > 1

    def _share(self, split: str) -> int:
        """About how many of ``split``'s samples this rank reads (for progress bars)."""
        return math.ceil(self.manifest.split(split).count / self.ctx.world)

    def _merged(self, part: FeatureSet) -> FeatureSet:
        """Every rank extracted its share of the samples; all ranks get the whole set, by key."""
        if not self.ctx.enabled:
            return part
        # the keys are short strings (a few MB for 250k images); the features go as tensors
        keys = [k for rank_keys in distributed.gather(part.keys, self.ctx) for k in rank_keys]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        features = torch.cat(distributed.gather_rows(part.features, self.ctx))[order]
        targets = torch.cat(distributed.gather_rows(part.targets, self.ctx))[order]
        return FeatureSet(features, targets, [keys[i] for i in order])

    # ---------------------------------------------------------------- head stage

    def head_stage(self) -> None:
        if self.config.convex_head:
            self._fit_head()
        else:
            self._head_epochs()

    def _fit_head(self) -> None:
        """The head at the optimum of its convex problem, L2 chosen by k-fold on train."""
        from tagmill.models import head
        from tagmill.train.head_fit import fit_head

        views, val = self._feature_cache()
        start = time.perf_counter()
        fit = fit_head([v.features for v in views], views[0].targets, self.objective, seed=self.config.seed,
                       folds=self.config.folds, device=self.device)
        self.log(fit.message)
        if self.config.augmentation is None and len(views) > 1 and fit.folds:
            # fine-tuning augments as the held-out data said the head should
            chosen = self.config.cache_augmentation if fit.views_used > 1 else "none"
            self.config = dataclasses.replace(self.config, augmentation=chosen)
            if self.ctx.is_main:
                write_run(self.run_dir, self.dataset, self.config)
        classifier = head(self.model)
        fit.load_into(classifier)
        if self.ctx.is_main and fit.oof_probs is not None:
            write_oof(self.run_dir, fit.oof_probs, fit.oof_targets, fit.folds)
        with torch.inference_mode():
            train_loss = mean_loss(self.loss_fn, classifier, views[0].features, views[0].targets, self.device)
            logits = classifier(val.features.to(self.device))  # (N, C)
            val_loss = self.loss_fn(logits, val.targets.to(self.device)).item()
        images = sum(len(v.keys) for v in views)
        self._end_epoch("head", train_loss, val_loss, self.objective.probabilities(logits).float().cpu(), val.targets,
                        time.perf_counter() - start, images, None, None)

    def _head_epochs(self) -> None:
        """fastai's frozen stage: one-cycle epochs of the head, on the cache."""
        from tagmill.models import head

        config, state = self.config, self.state
        views, val = self._feature_cache()
        lr = self.learning_rate()
        classifier = head(self.model)
        # one frozen epoch = one pass over every cached view (each an augmented copy of the data)
        train_set = TensorDataset(torch.cat([v.features for v in views]), torch.cat([v.targets for v in views]))
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=config.weight_decay)
        steps = len(loader)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps * config.head_epochs, pct_start=0.25)
        if state.optimizer is not None and state.epoch < config.head_epochs:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        while state.epoch < config.head_epochs and not self.stopped_early():
            epoch = state.epoch
            torch.manual_seed(config.seed * 1000 + epoch)
            start = time.perf_counter()
            classifier.train()
            total, seen = 0.0, 0
            with self.progress.task(f"epoch {epoch + 1} (head, cached features)", len(train_set)) as advance:
                for features, targets in loader:
                    features, targets = features.to(self.device), targets.to(self.device)  # (B, D), (B,) | (B, C)
                    loss = self.loss_fn(classifier(features), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    total += loss.item() * len(targets)
                    seen += len(targets)
                    advance(len(targets), f"loss {total / seen:.4f}")
            classifier.eval()
            with torch.inference_mode():
                logits = classifier(val.features.to(self.device))  # (N, C)
                val_loss = self.loss_fn(logits, val.targets.to(self.device)).item()
            self._end_epoch("frozen", total / max(seen, 1), val_loss, self.objective.probabilities(logits).float().cpu(), val.targets,
                            time.perf_counter() - start, seen, optimizer, scheduler)
        state.optimizer = state.scheduler = None  # the unfrozen stage starts its own

    # ---------------------------------------------------------------- unfrozen stage

    def _plan_unfrozen(self) -> int:
        """Whole-network epochs to run: --epochs, or as many as --time-budget leaves room for."""
        config = self.config
        wanted = config.unfrozen_epochs
        if config.time_budget is None:
            if wanted is None:
                self.log("whole-network fine-tuning: off (give --time-budget, e.g. 10m, to fine-tune while "
                         "validation improves, or --epochs N for exactly N epochs)")
            return wanted or 0
        left = config.time_budget - (time.perf_counter() - self.clock)
        per_epoch = self._epoch_seconds()
        fits = max(0, int(left // per_epoch)) if per_epoch else (wanted or 1)
        planned = min(fits, wanted) if wanted is not None else fits
        self.log(f"whole-network fine-tuning: {planned} epoch(s) planned; the budget leaves {left:.0f} s"
                 + (f", an epoch takes about {per_epoch:.0f} s" if per_epoch else ""))
        return planned

    def _epoch_seconds(self) -> float | None:
        """The expected length of one whole-network epoch plus its validation."""
        finished = [row["seconds"] for row in self.state.history if row["stage"] == "unfrozen"]
        if finished:
            return max(finished)
        if self.forward_rate is None:
            return None
        train = self._share("train") * TRAIN_STEP_COST
        return (train + self._share("val")) / self.forward_rate

    def unfrozen_stage(self) -> None:
        from tagmill.models import param_groups, unfreeze

        config, state = self.config, self.state
        if state.unfrozen_planned is None:
            state.unfrozen_planned = self._plan_unfrozen()
        if state.unfrozen_planned == 0:
            return
        _return_freed_memory()  # before the loader's workers fork from this process
        unfreeze(self.model)
        lr = config.lr * config.unfrozen_lr_scale if config.lr is not None else UNFROZEN_LR
        groups = param_groups(self.model, lr, lr_mult=config.lr_mult, weight_decay=config.weight_decay)
        optimizer = torch.optim.AdamW(groups)
        steps = self._steps("train") + (self.config.workers or 0) + 4  # streaming: a few partial batches per worker
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps * state.unfrozen_planned, pct_start=0.25
        )
        if state.optimizer is not None and state.epoch > config.head_epochs:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        end = config.head_epochs + state.unfrozen_planned
        # DDP averages gradients across ranks; without torchrun it is the plain model
        network = self._wrap_ddp()
        while state.epoch < end and not self.stopped_early():
            if config.time_budget is not None and state.epoch > config.head_epochs:
                left = config.time_budget - (time.perf_counter() - self.clock)
                if left < (self._epoch_seconds() or 0):
                    self.log(f"whole-network fine-tuning: stopped, {left:.0f} s of the budget left is less than an epoch")
                    break
            epoch = state.epoch
            torch.manual_seed(config.seed * 1000 + epoch)
            start = time.perf_counter()
            self.model.train()
            _keep_batchnorm_statistics(self.model)
            total, seen, fingerprint = 0.0, 0, 0
            loader = self._loader("train", train_transform(self.preprocess, config.cache_augmentation), shuffle=True, epoch=epoch)
            with self.progress.task(f"epoch {epoch + 1} (whole network)", self._share("train")) as advance, self._join(network):
                for images, targets, keys in loader:
                    images, targets = self._to_device(images), targets.to(self.device)
                    with autocast(self.device, config.precision):
                        logits = network(images)  # (B, C)
                    loss = self.loss_fn(logits.float(), targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler.last_epoch + 1 < scheduler.total_steps:
                        scheduler.step()
                    total += loss.item() * len(targets)
                    seen += len(targets)
                    fingerprint += sum(zlib.crc32(key.encode()) for key in keys)
                    advance(len(targets), f"loss {total / seen:.4f}")
            total, seen, fingerprint = distributed.sum_all([total, seen, fingerprint], self.ctx)
            read_bytes = [int(b) for b in distributed.gather(loader.dataset.bytes_read, self.ctx)]
            val_loss, probs, targets = self._validate()
            self._end_epoch("unfrozen", total / max(seen, 1), val_loss, probs, targets, time.perf_counter() - start, int(seen),
                            optimizer, scheduler, data_fingerprint=int(fingerprint), read_bytes=read_bytes)
        if self.stopped_early() and config.patience is None and state.epoch < end:
            self.log("whole-network fine-tuning: stopped, the last epoch did not improve validation")

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.ctx.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _join(self, network: torch.nn.Module):
        """Ranks may get a batch more or fewer (exact splitting, no padding): Join keeps
        DDP's gradient all-reduce from waiting on a rank that has run out of data."""
        if not self.ctx.enabled:
            return contextlib.nullcontext()
        from torch.distributed.algorithms.join import Join

        return Join([network])

    def final_report(self) -> None:
        """Evaluate the best checkpoint on validation: metrics, thresholds, plots, report.md."""
        from tagmill.train.evaluation import Predictions, predict_split, write_evaluation

        _return_freed_memory()  # the epochs' buffers, before this pass's workers fork

        best = load_checkpoint(storage.join(self.run_dir, BEST))
        self.model.load_state_dict(best["model"])
        cached = self._cache is not None or storage.exists(storage.join(self.run_dir, FEATURES))
        if best["stage"] in ("head", "frozen") and cached:
            # the backbone is the one whose validation features are cached: only the head runs
            from tagmill.models import head

            _, val = self._feature_cache()
            with torch.inference_mode():
                logits = head(self.model)(val.features.to(self.device)).float().cpu()  # (N, C)
            preds = Predictions(self.objective.probabilities(logits), val.targets,
                                self.objective.per_sample_loss(logits, val.targets), list(val.keys))
        else:
            preds = predict_split(
                self.model, self.dataset, self.manifest, "val", self.preprocess, device=self.device,
                precision=self.config.precision, batch_size=self.config.batch_size, progress=self.progress,
            )
        thresholds, source = self._thresholds(best["stage"])
        write_evaluation(
            self.run_dir, self.dataset, self.manifest, "val", preds,
            title=f"{self.config.backbone} on {storage.basename(self.dataset)}",
            config={"dataset": self.dataset, **self.config.as_dict()}, history=self.state.history,
            threshold=self.config.threshold, top_k=self.config.top_k,
            thresholds=thresholds, threshold_source=source,
            selection=self._selection_note(best),
            data_issues=self._data_issues(best["stage"]),
        )

    def _data_issues(self, best_stage: str) -> str:
        """report.md's data-issues section, from the out-of-fold probabilities and cached
        features this run holds (nothing is recomputed for it)."""
        from tagmill.doctor.in_training import data_issues_section

        cached = self._cache is not None or storage.exists(storage.join(self.run_dir, FEATURES))
        if not cached:
            return data_issues_section(self.dataset, self.manifest, [], None, None)
        views, val = self._feature_cache()
        oof = read_oof(self.run_dir) if best_stage == "head" else None
        return data_issues_section(self.dataset, self.manifest, views[0].keys, oof[:2] if oof else None,
                                   (views[0].features, val.features) if val is not None else None)

    def _thresholds(self, best_stage: str) -> tuple[list[float] | None, str]:
        """Multi-label: per-tag thresholds from out-of-fold predictions over train. The
        head's k-fold fit left them when it made the kept model; otherwise the kept
        model's own backbone features over train get a k-fold head fit for them."""
        from tagmill.train.evaluation import out_of_fold_thresholds
        from tagmill.train.head_fit import fit_head

        if self.objective.single:
            return None, ""
        oof = read_oof(self.run_dir) if best_stage == "head" else None
        if oof is not None:
            probs, targets, folds = oof
            return out_of_fold_thresholds(probs, targets, f"{folds}-fold head fit")
        population = None
        if best_stage == "frozen":  # the backbone is the cached one
            plain = self._feature_cache()[0][0]
            views, targets = [plain.features], plain.targets
            where = "k-fold head fits on the cached features"
        else:
            views, targets, population = self._fine_tuned_train_features()
            where = "k-fold head fits on the fine-tuned backbone's features, which saw these labels: somewhat optimistic"
        fit = fit_head(views, targets, self.objective, seed=self.config.seed, folds=self.config.folds, device=self.device,
                       final=False, population=population)  # the out-of-fold probabilities are all thresholds need
        if fit.oof_probs is None:
            return None, f"one threshold for every tag ({self.config.threshold:g}): {fit.message.removeprefix('head: ')}"
        return out_of_fold_thresholds(fit.oof_probs, fit.oof_targets, where)

    def _fine_tuned_train_features(self) -> tuple[list[torch.Tensor], torch.Tensor, Population | None]:
        """The kept model's plain features over train, for threshold tuning: only the rows
        cross-validation draws and the moments over all (``head_fit.Population``) when
        there are more training images than it draws, so that this pass holds at most
        CV_MAX_IMAGES rows (~4 KB each with the bench's backbone) whatever the split's size."""
        from tagmill.models import head
        from tagmill.train import head_fit
        from tagmill.train.features import extract_sample

        count = self.manifest.split("train").count
        dim = getattr(head(self.model), "in_features", None)
        sampled = dim is not None and head_fit.fits_on_a_sample(self.objective, count, dim)
        extract = dict(device=self.device, precision=self.config.precision, channels_last=self.config.channels_last,
                       progress=self.progress, description="training features for threshold tuning")

        def loader() -> DataLoader:
            return self._loader("train", eval_transform(self.preprocess), shuffle=False, across_ranks=False)

        if sampled:
            sample = extract_sample(self.model, loader(), head_fit.cv_rows(count, self.config.seed), **extract)
            if sample is not None:
                kept, moments = sample
                return [kept.features], kept.targets, head_fit.Population(count, *moments.result())
            self.log("threshold tuning: sample keys are not the importer's; holding every training image's features")
        plain = extract_features(self.model, loader(), total=count, **extract)
        return [plain.features], plain.targets, None

    def _selection_note(self, best: dict[str, Any]) -> str:
        epochs = len(self.state.history)
        if epochs <= 1:
            return "one model was trained (no choice between epochs was made on validation)"
        return (f"the best of {epochs} epochs by validation {self.objective.selection_metric} "
                f"(epoch {best['epoch']}, stage {best['stage']}): validation took part in that choice")

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)  # (B, 3, H, W)
        return images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images

    @torch.inference_mode()
    def _validate(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        self.model.eval()
        count = self.manifest.split("val").count  # this rank's share is at most all of it
        probs, targets, keys, total = Rows(count), Rows(count), [], 0.0  # not per-batch pieces: rows.py says why
        chunk = inference_chunk(self.device, self.preprocess.input_size)
        for images, target, batch_keys in self._loader("val", eval_transform(self.preprocess), shuffle=False):
            with autocast(self.device, self.config.precision):
                logits = run_chunked(self.model, self._to_device(images), chunk).float()  # (B, C)
            total += self.loss_fn(logits, target.to(self.device)).item() * len(target)
            probs.add(self.objective.probabilities(logits).cpu())
            targets.add(target)
            keys.extend(batch_keys)
        parts = distributed.gather((total, keys, probs.tensor(), targets.tensor()), self.ctx)
        total = sum(p[0] for p in parts)
        keys = [k for p in parts for k in p[1]]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        all_probs = torch.cat([p[2] for p in parts])[order]
        all_targets = torch.cat([p[3] for p in parts])[order]
        return total / max(len(keys), 1), all_probs, all_targets
