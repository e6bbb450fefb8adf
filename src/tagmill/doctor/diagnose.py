"""``tagmill doctor DATASET``: every check, from one set of features and one image pass.

    check the dataset ─► features of every split (a run's cache when it matches, else
    the model's backbone, else the default pretrained one) ─► one pass over the images
    (digests, perceptual hashes, sizes) ─► neighbours in feature space ─► label issues
    (k-fold heads over all images), duplicates and leakage, outliers, scarce classes

Nothing here writes files: ``doctor/report.py`` turns a :class:`Diagnosis` into the
report and the CSVs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tagmill import storage
from tagmill.dataset.manifest import Manifest, load_manifest, verify_shards
from tagmill.doctor.duplicates import DuplicatePair, find_duplicates
from tagmill.doctor.label_issues import LabelIssue, multi_label_issues, single_label_issues, with_tag_context
from tagmill.doctor.neighbours import nearest_neighbours
from tagmill.doctor.outliers import Outlier, Scarce, feature_outliers, image_outliers, scarce_labels
from tagmill.doctor.scan import ImageFacts, scan_dataset
from tagmill.errors import DatasetError, EmptyDatasetError, TagmillError
from tagmill.objective import Objective, objective
from tagmill.progress import SILENT, Progress
from tagmill.train.config import TrainConfig
from tagmill.train.features import FeatureSet

if TYPE_CHECKING:
    from tagmill.train.head_fit import HeadFit

#: feature neighbours kept per image: candidates for near copies, and isolation for outliers
NEIGHBOURS = 20


@dataclass
class Diagnosis:
    dataset: str
    manifest: Manifest
    facts: list[ImageFacts]  #: one per image, sorted by key; every row index below refers to it
    label_issues: list[LabelIssue]  #: flagged ones, most suspicious first (multi-label: per image and tag)
    ranking: list[int]  #: every row, most suspicious label first (what precision at k reads)
    duplicates: list[DuplicatePair]
    outliers: list[Outlier]
    scarce: list[Scarce]
    #: validation metric of a head trained on train, on all of val and on val without its
    #: images that have a copy in train; empty without a validation split
    leakage: dict[str, Any]
    features_from: str  #: in words: which model, and whether a run's cache was reused
    head: str  #: how the out-of-fold heads were chosen
    seconds: dict[str, float] = field(default_factory=dict)

    def is_leak(self, pair: DuplicatePair) -> bool:
        return self.facts[pair.a].split != self.facts[pair.b].split

    def is_conflict(self, pair: DuplicatePair) -> bool:
        return set(self.facts[pair.a].labels) != set(self.facts[pair.b].labels)

    def counts(self) -> dict[str, Any]:
        kinds = [p.kind for p in self.duplicates]
        return {
            "images": len(self.facts),
            "label_issues": len({i.index for i in self.label_issues}),
            "duplicate_pairs": {"exact": kinds.count("exact"), "near": kinds.count("near")},
            "leaked_pairs": sum(self.is_leak(p) for p in self.duplicates),
            "conflicting_pairs": sum(self.is_conflict(p) for p in self.duplicates),
            "outliers": {reason: sum(o.reason == reason for o in self.outliers) for reason in sorted({o.reason for o in self.outliers})},
            "scarce_labels": len(self.scarce),
        }


def _check(dataset: str, manifest: Manifest) -> None:
    verify_shards(dataset, manifest)  # a damaged shard is a DatasetError (exit 4) before minutes of work
    if len(manifest.classes) < 2:
        raise EmptyDatasetError(f"{dataset} has {len(manifest.classes)} class: labels cannot be checked against others")
    empty = [name for name, info in manifest.splits.items() if info.count == 0]
    if empty or "train" not in manifest.splits:
        which = ", ".join(empty) or "train"
        raise EmptyDatasetError(f"{dataset}: the {which} split holds no images", hint="re-import the data")


def _same_shards(other: str, manifest: Manifest) -> bool:
    """Whether the dataset at ``other`` holds exactly the shards of ``manifest`` (same
    sha256 per split): a run's cached features are then features of these images."""
    try:
        theirs = load_manifest(other)
    except TagmillError:
        return False  # moved or deleted since the run: recompute rather than guess
    return _shard_shas(theirs) == _shard_shas(manifest)


def _shard_shas(manifest: Manifest) -> dict[str, list[str]]:
    return {split: [shard.sha256 for shard in info.shards] for split, info in manifest.splits.items()}


def _features(dataset: str, manifest: Manifest, model_location: str | None, config: TrainConfig, progress: Progress,
              log: Callable[[str], None]) -> tuple[dict[str, FeatureSet], str]:
    """Plain (unaugmented) features of every split, and where they came from."""
    from tagmill.train.device import resolve_device
    from tagmill.train.features import load_features, plain_features
    from tagmill.train.loop import choose_open_settings, preprocess_for
    from tagmill.train.run_format import FEATURES, is_run, read_best, read_run

    device = resolve_device(config.device)
    found: dict[str, FeatureSet] = {}
    if model_location is not None:
        from tagmill.bundle.evaluate_model import load_model

        model, info, preprocess, _ = load_model(model_location)
        source = f"{info['title']} from {model_location}"
        if is_run(model_location) and storage.exists(storage.join(model_location, FEATURES)):
            run_dataset, run_config = read_run(model_location)
            frozen = read_best(model_location)["stage"] in ("head", "frozen")
            plain_first = run_config.convex_head or (run_config.cache_views or 1) > 1
            if frozen and plain_first and _same_shards(run_dataset, manifest):
                views, val = load_features(storage.join(model_location, FEATURES))
                cached = {"train": views[0], **({"val": val} if val is not None else {})}
                for split, features in cached.items():
                    if split in manifest.splits and len(features.keys) == manifest.split(split).count:
                        found[split] = features
                if found:
                    source += f" (the run's feature cache for {', '.join(found)})"
    else:
        from tagmill.models import create_classifier

        config = choose_open_settings(dataset, manifest, config, log)
        preprocess = preprocess_for(config)
        model = create_classifier(config.backbone, len(manifest.classes), pretrained=config.pretrained,
                                  weights=config.weights, pooling=config.model_pooling)
        source = f"{config.backbone} with its pretrained weights, {preprocess.input_size} px"
    model.to(device).eval()
    for split in manifest.splits:
        if split not in found:
            found[split] = plain_features(dataset, manifest, split, model, preprocess, config, device, progress,
                                          description=f"features of {split}")
    return found, source


def _aligned(facts: list[ImageFacts], features: dict[str, FeatureSet]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets in the row order of ``facts``."""
    where = {key: (split, i) for split, fs in features.items() for i, key in enumerate(fs.keys)}
    missing = [f.key for f in facts if f.key not in where]
    if missing:
        raise DatasetError(f"{len(missing)} images have no features (e.g. {missing[0]}): the shards changed while reading")
    rows = [where[f.key] for f in facts]
    x = torch.stack([features[s].features[i] for s, i in rows])
    y = torch.stack([features[s].targets[i] for s, i in rows])
    return x, y


def _label_issues(x: torch.Tensor, y: torch.Tensor, task: Objective, seed: int) -> tuple[list[LabelIssue], list[int], str]:
    from tagmill.train.head_fit import fit_head, out_of_fold_probabilities

    fit = fit_head([x], y, task, seed=seed, final=False)  # only the out-of-fold answers judge: no head over all rows
    if fit.oof_probs is not None and len(fit.oof_probs) == len(y):
        probs = fit.oof_probs
    else:
        probs, _ = out_of_fold_probabilities(x, y, task, l2=fit.l2, seed=seed)
    how = f"{fit.message.removeprefix('head: ')}; every image judged by the heads of the folds that did not hold it"
    if not task.single:
        how += ", then by its other tags (a regression per tag on the head's answer and the other given tags, out of fold too)"
    if task.single:
        ranked = single_label_issues(probs, y)
        return [i for i in ranked if i.flagged], [i.index for i in ranked], how
    probs = with_tag_context(probs, y, seed=seed)
    issues = multi_label_issues(probs, y)
    # an image's suspicion: its most suspicious tag; images with none flagged follow, by how
    # far any tag sits from its given value
    doubt = (probs - y.float()).abs().max(dim=1).values
    worst: dict[int, float] = {}
    for issue in issues:
        worst.setdefault(issue.index, issue.score)
    ranking = sorted(range(len(y)), key=lambda r: (r not in worst, -worst.get(r, 0.0), -float(doubt[r])))
    return issues, ranking, how


def _train_head(facts: list[ImageFacts], x: torch.Tensor, y: torch.Tensor, task: Objective, seed: int) -> HeadFit | None:
    """The head ``tagmill train`` would fit on the train split (L2 cross-validated on it),
    for the leakage check; None without a validation split to check."""
    from tagmill.train.head_fit import fit_head

    if not any(f.split == "val" for f in facts):
        return None
    train = torch.tensor([f.split == "train" for f in facts])
    return fit_head([x[train]], y[train], task, seed=seed)


def _leakage(facts: list[ImageFacts], x: torch.Tensor, y: torch.Tensor, pairs: list[DuplicatePair], task: Objective,
             fit: HeadFit | None) -> dict[str, Any]:
    """The validation metric of ``fit`` (``_train_head``) on all of val and on val without
    the images that have a copy in train."""
    if fit is None:
        return {}
    split = [f.split for f in facts]
    val = torch.tensor([s == "val" for s in split])
    leaked = torch.zeros(len(facts), dtype=torch.bool)
    for p in pairs:
        for me, other in ((p.a, p.b), (p.b, p.a)):
            if split[me] == "val" and split[other] == "train":
                leaked[me] = True
    probs = task.probabilities(x[val] @ fit.weight.T + fit.bias)
    clean = ~leaked[val]
    result = {"metric": task.selection_metric, "val_images": int(val.sum()), "leaked_val_images": int(leaked.sum()),
              "with_leaked": task.selection_score(probs, y[val])}
    result["without_leaked"] = task.selection_score(probs[clean], y[val][clean]) if clean.any() else None
    return result


def diagnose(dataset: str, *, model: str | None = None, config: TrainConfig | None = None, workers: int | None = None,
             progress: Progress = SILENT, log: Callable[[str], None] = lambda line: None) -> Diagnosis:
    config = config or TrainConfig()
    manifest = load_manifest(dataset)
    _check(dataset, manifest)
    task = objective(manifest.task)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    features, source = _features(dataset, manifest, model, config, progress, log)
    seconds["features"] = time.perf_counter() - start

    start = time.perf_counter()
    facts = scan_dataset(dataset, manifest, workers=workers, progress=progress)
    seconds["image_checks"] = time.perf_counter() - start

    start = time.perf_counter()
    x, y = _aligned(facts, features)
    neighbours = nearest_neighbours(x, min(NEIGHBOURS, len(facts) - 1))
    duplicates = find_duplicates(facts, x, neighbours)
    seconds["neighbours_and_duplicates"] = time.perf_counter() - start

    start = time.perf_counter()
    # the leakage check's head and the label check's cross-validation are independent
    # fits of a few thousand rows, each bound by one core: side by side on two threads,
    # torch's intra-op threads at one for both (the count is process-wide: a fit that
    # set and restored it itself would change it under the other)
    from tagmill.train.head_fit import intra_op_threads

    with intra_op_threads(1), ThreadPoolExecutor(1, thread_name_prefix="tagmill-leakage-head") as pool:
        train_head = pool.submit(_train_head, facts, x, y, task, config.seed)
        issues, ranking, how = _label_issues(x, y, task, config.seed)
        leakage = _leakage(facts, x, y, duplicates, task, train_head.result())
    seconds["label_issues_and_leakage"] = time.perf_counter() - start

    start = time.perf_counter()
    outliers = image_outliers(facts) + feature_outliers(x, neighbours, y if task.single else None)
    # images that are barely images first (certain), then the feature tests by z-score
    outliers.sort(key=lambda o: (o.reason in ("unlike-any-image", "unlike-its-class"), -o.score))
    seconds["outliers"] = time.perf_counter() - start
    return Diagnosis(dataset, manifest, facts, issues, ranking, duplicates, outliers, scarce_labels(manifest),
                     leakage, source, how, seconds)


__all__ = ["NEIGHBOURS", "Diagnosis", "diagnose"]
