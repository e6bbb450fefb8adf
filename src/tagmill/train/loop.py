"""``tagmill train``: fastai-style fine-tuning, fast on a CPU.

    frozen stage   : backbone features cached once (augmented views), head trained on
                     the cache with a one-cycle schedule — seconds, not minutes, per epoch
    unfrozen stage : the whole network, discriminative learning rates (earlier layers
                     learn slower), one-cycle, optional bf16 autocast and channels-last

After every epoch: one line of metrics (``metrics.jsonl``), ``last.pt`` (everything
needed to resume), and ``best.pt`` when the validation metric improved. Each epoch
seeds its own randomness from (seed, epoch), so a run resumed after a kill ends where
an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from tagmill import storage
from tagmill.dataset.manifest import Manifest, load_manifest, verify_shards
from tagmill.dataset.shard_cache import ShardCache
from tagmill.dataset.torch_data import ShardDataset
from tagmill.dataset.transforms import Preprocess, eval_transform, train_transform
from tagmill.errors import CheckpointError, DatasetError, InputError
from tagmill.progress import SILENT, Progress
from tagmill.train import distributed
from tagmill.train.checkpoint import load_checkpoint, save_checkpoint
from tagmill.train.config import TrainConfig
from tagmill.train.device import autocast, inference_chunk, resolve_device, run_chunked
from tagmill.train.features import FeatureSet, extract_features, load_features, save_features

LAST, BEST, FEATURES, METRICS, CONFIG = "last.pt", "best.pt", "features.safetensors", "metrics.jsonl", "config.json"


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


def metric_name(task: str) -> str:
    return "accuracy" if task == "single" else "fbeta"


def preprocess_for(config: TrainConfig) -> Preprocess:
    from tagmill.models import pretrained_config

    cfg = pretrained_config(config.backbone)
    return Preprocess(
        input_size=config.image_size or cfg.input_size,
        resize_method=config.resize_method,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation,
    )


def read_run(run_dir: str) -> tuple[str, TrainConfig]:
    """The dataset and configuration a run directory was started with."""
    location = storage.join(run_dir, CONFIG)
    if not storage.exists(location):
        raise InputError(f"{run_dir} is not a training run (it has no {CONFIG})")
    saved = json.loads(storage.read_text(location))
    return saved["dataset"], TrainConfig.from_dict(saved["config"])


def train(
    dataset: str | None,
    run_dir: str,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: Progress = SILENT,
    log: Callable[[str], None] = lambda line: None,
) -> TrainResult:
    """Train on ``dataset`` into ``run_dir``; with ``resume``, continue the run there
    (its dataset and configuration come from the run directory). Under torchrun every
    rank calls this; only rank 0 writes."""
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
        return _train(dataset, run_dir, config, manifest, ctx, resolve_device(device_name), resume, progress, log)
    finally:
        distributed.stop()


def _train(dataset, run_dir, config, manifest, ctx, device, resume, progress, log) -> TrainResult:
    from tagmill.models import check_image_size, create_classifier

    if not ctx.is_main:
        progress, log = SILENT, (lambda line: None)  # one set of bars and epoch lines per job
    preprocess = preprocess_for(config)
    check_image_size(config.backbone, preprocess.input_size)

    state = _State()
    checkpoint: dict[str, Any] | None = None
    if not resume:
        _start_run_dir(run_dir, dataset, config, ctx)
    elif storage.exists(storage.join(run_dir, LAST)):
        checkpoint = load_checkpoint(storage.join(run_dir, LAST))
        _check_checkpoint(checkpoint, manifest)
        state = _State(
            checkpoint["epoch"], checkpoint["history"], checkpoint["best_metric"], checkpoint["bad_epochs"],
            checkpoint["optimizer"], checkpoint["scheduler"],
        )
    # else: killed before its first epoch ended; start over in the same directory

    torch.manual_seed(config.seed)
    fresh = checkpoint is None and config.init_from is None
    model = create_classifier(
        config.backbone, len(manifest.classes), pretrained=config.pretrained and fresh,
        weights=config.weights if fresh else None,
    )
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif config.init_from is not None:
        from tagmill.train.init_from import init_from_bundle

        log(f"starting from {config.init_from}: {init_from_bundle(model, config.init_from, manifest.classes).describe()}")
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)

    run = _Run(dataset, run_dir, manifest, config, preprocess, model, device, state, progress, log, ctx)
    if state.epoch < config.frozen_epochs and not run.stopped_early():
        run.frozen_stage()
    if state.epoch < config.frozen_epochs + config.unfrozen_epochs and not run.stopped_early():
        run.unfrozen_stage()
    if ctx.is_main:
        # the other ranks may exit meanwhile: torchrun waits for all, and no collective
        # remains that could time out while rank 0 evaluates a large validation split
        run.final_report()
    return TrainResult(run_dir, state.history, state.best_metric, metric_name(manifest.task))


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
        saved = {"dataset": dataset, "config": config.as_dict()}
        storage.write_bytes(storage.join(run_dir, CONFIG), (json.dumps(saved, indent=2) + "\n").encode())


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


class _Run:
    """One training run's moving parts, shared by its two stages."""

    def __init__(self, dataset, run_dir, manifest, config, preprocess, model, device, state, progress, log, ctx) -> None:
        self.dataset, self.run_dir, self.manifest, self.config = dataset, run_dir, manifest, config
        self.preprocess, self.model, self.device, self.state = preprocess, model, device, state
        self.progress, self.log, self.ctx = progress, log, ctx
        #: per-rank batch: the configured batch size is the global one
        self.batch_size = max(1, config.batch_size // ctx.world)
        self.cache = ShardCache(config.cache_dir, int(config.cache_gb * 1e9)) if config.cache_dir else None
        self.task = manifest.task
        self.loss_fn = self._loss()

    # ---------------------------------------------------------------- shared pieces

    def _loss(self) -> torch.nn.Module:
        if self.task == "single":
            return torch.nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        pos_weight = None
        if self.config.pos_weight:
            train = self.manifest.split("train")
            positives = torch.tensor([max(train.class_counts[c], 1) for c in self.manifest.classes], dtype=torch.float32)
            # negatives / positives, capped so a tag seen twice does not dominate the loss
            pos_weight = ((train.count - positives) / positives).clamp(1.0, 50.0).to(self.device)
        return torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def _loader(self, split: str, transform, *, shuffle: bool, epoch: int = 0) -> DataLoader:
        data = ShardDataset(self.dataset, split, transform, manifest=self.manifest, shuffle=shuffle, seed=self.config.seed,
                            cache=self.cache)
        data.set_epoch(epoch)
        workers = self.config.workers if self.config.workers is not None else min(4, os.cpu_count() or 1)
        return DataLoader(
            data, batch_size=self.batch_size, num_workers=workers,
            persistent_workers=False, pin_memory=self.device.type == "cuda",
        )

    def _steps(self, split: str) -> int:
        return math.ceil(self.manifest.split(split).count / self.ctx.world / self.batch_size)

    def stopped_early(self) -> bool:
        return self.config.patience is not None and self.state.bad_epochs >= self.config.patience

    def _evaluate(self, probs: torch.Tensor, targets: torch.Tensor):
        from tagmill.evaluate import multi_label_metrics, single_label_metrics

        if self.task == "single":
            return single_label_metrics(probs, targets, self.manifest.classes, top_k=self.config.top_k)
        return multi_label_metrics(probs, targets, self.manifest.classes, threshold=self.config.threshold)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(-1) if self.task == "single" else logits.sigmoid()

    def _end_epoch(self, stage: str, train_loss: float, val_loss: float, probs, targets, seconds: float, images: int,
                   optimizer, scheduler, data_fingerprint: int | None = None) -> None:
        result = self._evaluate(probs, targets)
        name = metric_name(self.task)
        value = float(result.headline[name])
        state = self.state
        state.epoch += 1
        row = {
            "epoch": state.epoch, "stage": stage, "train_loss": train_loss, "val_loss": val_loss,
            "metric": name, "val_metric": value,
            **{f"val_{k}": float(v) for k, v in result.headline.items() if k != name},
            "images_per_s": round(images / max(seconds, 1e-9), 1), "seconds": round(seconds, 2),
            "train_images": images,
        }
        if data_fingerprint is not None:
            # sum of CRC32s of the sample keys trained on: equal across runs exactly when
            # every sample was seen once, whatever the number of ranks and workers
            row["train_fingerprint"] = data_fingerprint
        state.history.append(row)
        improved = value > state.best_metric
        state.best_metric = max(state.best_metric, value)
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        state.optimizer, state.scheduler = optimizer.state_dict(), scheduler.state_dict()
        self.log(
            f"epoch {state.epoch:>3} {stage:<8} train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
            f"{name} {value:.4f}{'  *' if improved else ''}  {row['images_per_s']:.0f} img/s"
        )
        if not self.ctx.is_main:
            return
        checkpoint = {
            "epoch": state.epoch, "stage": stage, "classes": self.manifest.classes, "task": self.task,
            "preprocess": self.preprocess.as_dict(), "config": self.config.as_dict(), "dataset": self.dataset,
            "model": self.model.state_dict(), "optimizer": state.optimizer, "scheduler": state.scheduler,
            "history": state.history, "best_metric": state.best_metric, "bad_epochs": state.bad_epochs,
        }
        if improved:
            save_checkpoint(storage.join(self.run_dir, BEST), {**checkpoint, "metrics": result.as_dict()})
        save_checkpoint(storage.join(self.run_dir, LAST), checkpoint)
        lines = "".join(json.dumps(r) + "\n" for r in state.history)
        storage.write_bytes(storage.join(self.run_dir, METRICS), lines.encode())

    # ---------------------------------------------------------------- frozen stage

    def _feature_cache(self) -> tuple[list[FeatureSet], FeatureSet]:
        location = storage.join(self.run_dir, FEATURES)
        if storage.exists(location):
            views, val = load_features(location)
            if len(views) == self.config.cache_views and val is not None:
                return views, val
        config = self.config
        extract = dict(device=self.device, precision=config.precision, channels_last=config.channels_last, progress=self.progress)
        views = []
        for view in range(config.cache_views):
            # view 0 is unaugmented when several views are cached: the plain image is a
            # sample the head should see; later views are augmented
            transform = eval_transform(self.preprocess) if view == 0 and config.cache_views > 1 else train_transform(self.preprocess, config.augmentation)
            torch.manual_seed(config.seed * 7919 + view)
            loader = self._loader("train", transform, shuffle=False)
            views.append(self._merged(extract_features(self.model, loader, description=f"caching features (view {view + 1}/{config.cache_views})",
                                                       total=self._share("train"), **extract)))
        val = self._merged(extract_features(self.model, self._loader("val", eval_transform(self.preprocess), shuffle=False),
                                            description="caching validation features", total=self._share("val"), **extract))
        if self.ctx.is_main:
            save_features(location, views, val)
        return views, val

    def _share(self, split: str) -> int:
        """About how many of ``split``'s samples this rank reads (for progress bars)."""
        return math.ceil(self.manifest.split(split).count / self.ctx.world)

    def _merged(self, part: FeatureSet) -> FeatureSet:
        """Every rank extracted its share of the samples; all ranks get the whole set, by key."""
        if not self.ctx.enabled:
            return part
        parts = distributed.gather(part, self.ctx)
        keys = [k for p in parts for k in p.keys]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        features = torch.cat([p.features for p in parts])[order]
        targets = torch.cat([p.targets for p in parts])[order]
        return FeatureSet(features, targets, [keys[i] for i in order])

    def frozen_stage(self) -> None:
        from tagmill.models import head

        config, state = self.config, self.state
        views, val = self._feature_cache()
        classifier = head(self.model)
        # one frozen epoch = one pass over every cached view (each an augmented copy of the data)
        train_set = TensorDataset(torch.cat([v.features for v in views]), torch.cat([v.targets for v in views]))
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True)
        optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps = len(loader)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps * config.frozen_epochs, pct_start=0.25)
        if state.optimizer is not None and state.epoch < config.frozen_epochs:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        while state.epoch < config.frozen_epochs and not self.stopped_early():
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
            self._end_epoch("frozen", total / max(seen, 1), val_loss, self._probs(logits).float().cpu(), val.targets,
                            time.perf_counter() - start, seen, optimizer, scheduler)
        state.optimizer = state.scheduler = None  # the unfrozen stage starts its own

    # ---------------------------------------------------------------- unfrozen stage

    def unfrozen_stage(self) -> None:
        from tagmill.models import param_groups, unfreeze

        config, state = self.config, self.state
        unfreeze(self.model)
        lr = config.lr * config.unfrozen_lr_scale
        groups = param_groups(self.model, lr, lr_mult=config.lr_mult, weight_decay=config.weight_decay)
        optimizer = torch.optim.AdamW(groups)
        steps = self._steps("train") + (self.config.workers or 0) + 4  # streaming: a few partial batches per worker
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in groups], total_steps=steps * config.unfrozen_epochs, pct_start=0.25
        )
        if state.optimizer is not None and state.epoch > config.frozen_epochs:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        end = config.frozen_epochs + config.unfrozen_epochs
        # DDP averages gradients across ranks; without torchrun it is the plain model
        network = self._wrap_ddp()
        while state.epoch < end and not self.stopped_early():
            epoch = state.epoch
            torch.manual_seed(config.seed * 1000 + epoch)
            start = time.perf_counter()
            self.model.train()
            _keep_batchnorm_statistics(self.model)
            total, seen, fingerprint = 0.0, 0, 0
            loader = self._loader("train", train_transform(self.preprocess, config.augmentation), shuffle=True, epoch=epoch)
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
            val_loss, probs, targets = self._validate()
            self._end_epoch("unfrozen", total / max(seen, 1), val_loss, probs, targets, time.perf_counter() - start, int(seen),
                            optimizer, scheduler, data_fingerprint=int(fingerprint))

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
        from tagmill.train.evaluation import predict_split, write_evaluation

        best = load_checkpoint(storage.join(self.run_dir, BEST))
        self.model.load_state_dict(best["model"])
        preds = predict_split(
            self.model, self.dataset, self.manifest, "val", self.preprocess, device=self.device,
            precision=self.config.precision, batch_size=self.config.batch_size, progress=self.progress,
        )
        write_evaluation(
            self.run_dir, self.dataset, self.manifest, "val", preds,
            title=f"{self.config.backbone} on {storage.basename(self.dataset)}",
            config={"dataset": self.dataset, **self.config.as_dict()}, history=self.state.history,
            threshold=self.config.threshold, top_k=self.config.top_k,
        )

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)  # (B, 3, H, W)
        return images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images

    @torch.inference_mode()
    def _validate(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        self.model.eval()
        probs, targets, keys, total = [], [], [], 0.0
        chunk = inference_chunk(self.device, self.preprocess.input_size)
        for images, target, batch_keys in self._loader("val", eval_transform(self.preprocess), shuffle=False):
            with autocast(self.device, self.config.precision):
                logits = run_chunked(self.model, self._to_device(images), chunk).float()  # (B, C)
            total += self.loss_fn(logits, target.to(self.device)).item() * len(target)
            probs.append(self._probs(logits).cpu())
            targets.append(target)
            keys.extend(batch_keys)
        parts = distributed.gather((total, keys, torch.cat(probs), torch.cat(targets)), self.ctx)
        total = sum(p[0] for p in parts)
        keys = [k for p in parts for k in p[1]]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        all_probs = torch.cat([p[2] for p in parts])[order]
        all_targets = torch.cat([p[3] for p in parts])[order]
        return total / max(len(keys), 1), all_probs, all_targets
