"""``tagmill lr-find``: fastai's learning-rate finder, on the frozen stage's feature cache.

fastai's ``lr_find`` trains for ~100 batches while the learning rate grows
exponentially from 1e-7 to 10, records an exponentially smoothed loss, stops when the
loss blows up, and suggests a learning rate from the shape of the curve. In the frozen
stage only the head trains, so here the sweep runs on the backbone's pooled features,
computed once: the 100 steps cost milliseconds instead of 100 forward passes through
the backbone.

    sweep_lr    the sweep itself, over any ``step(lr) -> loss`` (no torch in sight)
    sweep_head  the sweep for a linear head on cached features (N, D)
    find_lr     dataset in, ``lr_find.png`` + ``lr_find.json`` out

Every sweep ends with a finite, positive suggestion: when the curve cannot be read
(too few points, a flat or non-finite loss, too few images) the suggestion is the
caller's ``fallback_lr``, ``method`` says "fallback" and ``message`` says why.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from tagmill import storage
from tagmill.dataset.manifest import load_manifest, verify_shards
from tagmill.errors import DatasetError, InputError
from tagmill.progress import SILENT, Progress
from tagmill.train.config import TrainConfig
from tagmill.train.features import plain_features

PLOT, RESULT = "lr_find.png", "lr_find.json"

#: the suggestion when a sweep cannot be read (TrainConfig's documented default lr)
DEFAULT_LR = 5e-3
#: a curve with fewer finite points than this is too short to read a learning rate from
MIN_POINTS = 10
#: fewer training images than this: the "curve" would measure how fast the head
#: memorises a handful of samples, not a learning rate
MIN_IMAGES = 8
#: fastai's valley needs a decreasing run; one of fewer points is noise, not a valley
MIN_VALLEY = 3
#: the smoothed loss moved by less than this fraction of its size: a flat curve
FLAT = 1e-3


@dataclass
class LRSweep:
    lrs: list[float]  #: the learning rate of each step, increasing
    losses: list[float]  #: the smoothed loss after each step (bias-corrected EMA, as fastai)
    raw_losses: list[float]  #: each step's batch loss
    suggestion: float  #: always finite and > 0
    method: str  #: "valley" (fastai's default), "steep" (steepest descent) or "fallback"
    message: str  #: one sentence: what was done, and for a fallback, why

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def sweep_lr(
    step: Callable[[float], float],
    *,
    start: float = 1e-7,
    end: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge: float = 4.0,
    fallback_lr: float = DEFAULT_LR,
) -> LRSweep:
    """Call ``step(lr)`` (one optimisation step at ``lr``, returning the batch loss) at
    ``num_steps`` learning rates growing exponentially from ``start`` to ``end``.

    The sweep stops early when the smoothed loss exceeds ``diverge`` times the best
    smoothed loss so far, or a loss is not finite. Losses are taken to be >= 0, as every
    cross-entropy is (the divergence test is skipped while the best loss is <= 0).
    """
    _check_range(start, end, num_steps, fallback_lr)
    if not 0 <= smoothing < 1:
        raise InputError(f"smoothing must be in [0, 1), got {smoothing!r}")
    if not diverge > 1:
        raise InputError(f"the divergence factor must be > 1, got {diverge!r}")
    lrs: list[float] = []
    losses: list[float] = []
    raw: list[float] = []
    average, best = 0.0, math.inf
    stopped = ""
    for i in range(num_steps):
        lr = start * (end / start) ** (i / (num_steps - 1))
        loss = float(step(lr))
        if not math.isfinite(loss):
            stopped = f"the loss was not finite at lr {_lr(lr)}"
            break
        average = smoothing * average + (1 - smoothing) * loss
        # bias correction: the average starts at 0, so early values would read too low
        smoothed = average / (1 - smoothing ** (i + 1))
        lrs.append(lr)
        raw.append(loss)
        losses.append(smoothed)
        best = min(best, smoothed)
        if best > 0 and smoothed > diverge * best:
            stopped = f"the loss diverged at lr {_lr(lr)}"
            break
    suggestion, method, message = _suggest(lrs, losses, num_steps, fallback_lr, stopped)
    return LRSweep(lrs, losses, raw, suggestion, method, message)


def _check_range(start: float, end: float, num_steps: int, fallback_lr: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end) and 0 < start < end):
        raise InputError(f"the sweep needs 0 < start lr < end lr, got {start!r} and {end!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < MIN_POINTS:
        raise InputError(f"the sweep needs at least {MIN_POINTS} steps, got {num_steps!r}")
    if not (math.isfinite(fallback_lr) and fallback_lr > 0):
        raise InputError(f"the fallback learning rate must be finite and > 0, got {fallback_lr!r}")


def _suggest(lrs: list[float], losses: list[float], num_steps: int, fallback_lr: float, stopped: str) -> tuple[float, str, str]:
    """(suggestion, method, message) for a recorded curve."""
    default = f"using the default learning rate {_lr(fallback_lr)}"
    why = f" ({stopped})" if stopped else ""
    if len(lrs) < MIN_POINTS:
        return fallback_lr, "fallback", f"the sweep stopped after {len(lrs)} steps{why}: too few to read a learning rate from; {default}"
    # fastai drops the first tenth (the average is still settling) and the last 5 points
    # (the blow-up); a short sweep keeps all its points rather than keep almost none
    first, last = num_steps // 10, 5
    if len(lrs) - first - last < MIN_POINTS:
        first, last = 0, 0
    lr = np.asarray(lrs[first : len(lrs) - last], dtype=np.float64)  # (n,)
    loss = np.asarray(losses[first : len(losses) - last], dtype=np.float64)  # (n,)
    swept = f"swept lr {_lr(lrs[0])} to {_lr(lrs[-1])} in {len(lrs)} steps" + (f"; {stopped}" if stopped else "")
    spread = float(loss.max() - loss.min())
    if spread <= FLAT * max(float(np.abs(loss).max()), 1e-12):
        return fallback_lr, "fallback", f"the loss did not change over the sweep ({swept}); {default}"
    index, length = _valley(loss)
    if length >= MIN_VALLEY:
        return float(lr[index]), "valley", f"suggested lr {_lr(lr[index])} from the longest valley of the loss curve ({swept})"
    index = _steepest(lr, loss)
    if index is None:
        return fallback_lr, "fallback", f"the loss never fell during the sweep ({swept}); {default}"
    return float(lr[index]), "steep", f"no clear valley in the loss curve: suggested lr {_lr(lr[index])}, where it falls fastest ({swept})"


def _valley(loss: np.ndarray) -> tuple[int, int]:
    """fastai's ``valley`` suggestion: (index, points in the valley) for a curve (n,).

    ``runs[i]`` is the length of the longest strictly decreasing subsequence ending at
    point i; the longest one, ending at ``end``, is taken to span ``runs[end]`` points
    before it, and the suggestion sits half-way down its middle third (fastai: "the
    lr where the loss is still falling steadily, before it bottoms out"). One deviation:
    fastai's start index can come out as -1 (a run from the very first point), which
    Python reads as the *last* point; it is clamped to 0 here.
    """
    n = len(loss)
    runs = np.ones(n, dtype=np.int64)  # (n,)
    for i in range(1, n):
        higher = loss[:i] > loss[i]  # (i,) earlier points this one continues a descent from
        if higher.any():
            runs[i] = runs[:i][higher].max() + 1
    end = int(runs.argmax())  # the first of the longest, as fastai's strict comparison picks
    start = max(end - int(runs[end]), 0)
    sections = (end - start) / 3
    return start + int(sections) + int(sections / 2), int(runs[end])


def _steepest(lr: np.ndarray, loss: np.ndarray) -> int | None:
    """fastai's ``steep``: the point where the loss falls fastest per log-lr; None if it never falls."""
    slopes = np.diff(loss) / np.diff(np.log(lr))  # (n - 1,)
    index = int(slopes.argmin())
    return index if slopes[index] < 0 else None


def _fallback(fallback_lr: float, message: str) -> LRSweep:
    return LRSweep([], [], [], fallback_lr, "fallback", message)


def _lr(value: float) -> str:
    """5e-3 -> "5.0e-03": the one form every learning rate is printed in (the CLI and plot too)."""
    return f"{value:.1e}"


# ---------------------------------------------------------------- the head on cached features


def sweep_head(
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    task: Literal["single", "multi"],
    head: torch.nn.Module,
    batch_size: int = 64,
    seed: int = 0,
    start: float = 1e-7,
    end: float = 10.0,
    num_steps: int = 100,
    weight_decay: float = 0.01,
    fallback_lr: float = DEFAULT_LR,
    device: torch.device | str | None = None,
) -> LRSweep:
    """The sweep for ``head`` (the classifier, usually an ``nn.Linear``) trained with
    AdamW on pooled features (N, D): cross-entropy on class indices (N,) for
    ``task="single"``, BCE with logits on multi-hot targets (N, C) for ``"multi"``.

    A deep copy of ``head`` trains; the caller's head is left as it was. Batches are
    drawn from seeded shuffles of the N samples, pass after pass, so a small set is
    cycled over and the same seed gives the same sweep.
    """
    if task not in ("single", "multi"):
        raise InputError(f"task must be 'single' or 'multi', not {task!r}")
    if features.ndim != 2 or len(targets) != len(features):
        raise InputError(f"features must be (N, D) with one target each, got {tuple(features.shape)} and {len(targets)} targets")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch size must be a positive integer, not {batch_size!r}")
    _check_range(start, end, num_steps, fallback_lr)
    count = len(features)
    if count < MIN_IMAGES:
        return _fallback(fallback_lr, f"only {count} training images: too few to sweep (it needs at least {MIN_IMAGES}); "
                                      f"using the default learning rate {_lr(fallback_lr)}")

    device = torch.device(device) if device is not None else features.device
    model = copy.deepcopy(head).to(device).train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # a head taken from a frozen model still trains here
    features = features.to(device, torch.float32)  # (N, D)
    targets = targets.to(device, torch.long if task == "single" else torch.float32)  # (N,) | (N, C)
    loss_fn = torch.nn.CrossEntropyLoss() if task == "single" else torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=start, weight_decay=weight_decay)
    batches = _batches(count, min(batch_size, count), seed)

    def step(lr: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = next(batches).to(device)  # (B,)
        loss = loss_fn(model(features[index]), targets[index])  # logits (B, C)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return sweep_lr(step, start=start, end=end, num_steps=num_steps, fallback_lr=fallback_lr)


def _batches(count: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Index batches (size,) over ``count`` samples, a fresh seeded shuffle each pass.

    A partial last batch is dropped, as training loaders do: one batch of 3 samples
    among batches of 64 would put a spike in the curve that is not the learning rate's.
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)  # (count,)
        for first in range(0, count - size + 1, size):
            yield order[first : first + size]


# ---------------------------------------------------------------- a dataset end to end


def find_lr(
    dataset: str,
    out_dir: str,
    config: TrainConfig,
    *,
    start: float = 1e-7,
    end: float = 10.0,
    num_steps: int = 100,
    progress: Progress = SILENT,
    log: Callable[[str], None] = lambda line: None,
) -> LRSweep:
    """Sweep the head's learning rate on ``dataset``'s training features; write
    ``out_dir/lr_find.png`` and ``out_dir/lr_find.json``.

    The model is the one ``tagmill train`` starts from (``config.backbone`` with its
    pretrained or given weights, a fresh head). ``config.lr`` is the fallback when the
    sweep cannot be read (``DEFAULT_LR`` if it is not a number).
    """
    from tagmill.evaluate import plot_lr_sweep
    from tagmill.models import check_image_size, create_classifier, head
    from tagmill.train.device import resolve_device

    manifest = load_manifest(dataset)
    verify_shards(dataset, manifest)
    if "train" not in manifest.splits or manifest.splits["train"].count == 0:
        raise DatasetError("the dataset has no training images")
    fallback = _fallback_lr(config)
    device = resolve_device(config.device)
    # the settings and preprocessing training would choose and cache its plain view with
    from tagmill.train.loop import choose_open_settings, preprocess_for

    config = choose_open_settings(dataset, manifest, config, log)
    preprocess = preprocess_for(config)
    check_image_size(config.backbone, preprocess.input_size)
    _check_range(start, end, num_steps, fallback)  # before the minutes of feature extraction

    torch.manual_seed(config.seed)
    model = create_classifier(config.backbone, len(manifest.classes), pretrained=config.pretrained, weights=config.weights,
                              pooling=config.model_pooling)
    model.to(device)
    train = plain_features(dataset, manifest, "train", model, preprocess, config, device, progress,
                           description="caching features for the lr sweep")
    sweep = sweep_head(
        train.features, train.targets, task=manifest.task, head=head(model), batch_size=config.batch_size,
        seed=config.seed, start=start, end=end, num_steps=num_steps, fallback_lr=fallback, device=device,
    )
    storage.makedirs(out_dir)
    plot_lr_sweep(sweep, storage.join(out_dir, PLOT))
    storage.write_bytes(storage.join(out_dir, RESULT), (json.dumps(sweep.as_dict(), indent=2) + "\n").encode())
    log(sweep.message)
    return sweep


def _fallback_lr(config: TrainConfig) -> float:
    """``config.lr`` when it is a usable number (it may become None: "find it for me")."""
    lr = getattr(config, "lr", None)
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0:
        return float(lr)
    return DEFAULT_LR


__all__ = ["DEFAULT_LR", "LRSweep", "find_lr", "sweep_head", "sweep_lr"]
