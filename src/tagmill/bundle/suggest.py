"""What to label next: unlabelled images ranked by how much a label would teach the model.

Two things make an image worth a person's time (``choose``):

- **uncertainty** — single-label: the margin between the two most probable classes
  (``1 - (p1 - p2)``: a coin toss between two classes scores 1); multi-label: how close
  the tag nearest its decision threshold is to it (1 at the bundle's threshold, 0 at
  certainty either way, the distance scaled by the room on that side of the threshold);
- **diversity** — the N most uncertain images are often N views of one confusing kind
  of picture (or copies of one image). So the ``POOL_FACTOR`` × N most uncertain are
  clustered into N groups in backbone-feature space (k-means weighted by uncertainty,
  as Zhdanov's "diverse mini-batch active learning", 2019) and each group gives its most
  uncertain member.

``suggest`` runs this over what ``tagmill predict`` reads (files, folders, packed
datasets, URLs; ``batch_predict``'s input handling), and ``write_suggestions`` writes a
CSV that ``tagmill import`` reads back — ``id`` (the copied image, beside the CSV),
``labels`` (the model's guess, for a person to correct), then ``confidence``,
``priority`` and ``source`` columns the importer ignores — with the chosen images
copied into a folder next to it, so the file is a self-contained labelling job.

A folder that ``tagmill serve --capture`` fills (``formats/captures.py``'s layout) is
read as its images only — the tar parts' images, and in folders of earlier layouts the
loose images, never the predictions beside them or the temporary file of an interrupted
write — and what the server answered for each chosen image goes into the CSV
(``served_labels``, ``served_confidence``, ``served_version``, ``captured_at``): read for
the chosen images only (once per part that holds one).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from tagmill import storage
from tagmill.formats import captures
from tagmill.bundle.batch_predict import WorkItem, batched, capture_tasks, plan, task_inputs
from tagmill.formats.captures import MARKER as CAPTURE_MARKER, SIDECAR_SUFFIX
from tagmill.bundle.predictor import Predictor
from tagmill.errors import InputError, UnreadableImageError
from tagmill.formats.base import has_image_extension, image_extension
from tagmill.progress import SILENT, Progress

#: how many times N of the most uncertain images the diversity step clusters. Chosen on
#: bench/active.py's development split (Fashion-MNIST train images; the reported numbers
#: are on the t10k images): see bench/README.md, "active learning"
POOL_FACTOR = 3
#: the features are projected onto their top principal directions before clustering:
#: k-means distances over ~4,000 pooled features would cost 30x more for the same groups
PROJECTED_DIMS = 128
#: Lloyd iterations of the k-means; it settles in far fewer on a few thousand points
KMEANS_ITERATIONS = 25
#: the labels separator written for multi-label guesses (``tagmill import --tag-sep``)
TAG_SEPARATOR = "|"
#: CSV columns for a captured image: what the server answered when it was captured
SERVED_COLUMNS = ("served_labels", "served_confidence", "served_version", "captured_at")


# --- the ranking ------------------------------------------------------------------


def uncertainty(probabilities: np.ndarray, task: str, thresholds: tuple[float, ...] | None = None) -> np.ndarray:
    """(N, C) probabilities -> (N,) uncertainty in [0, 1] (see the module docstring)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        return np.zeros(p.shape[0] if p.ndim else 0)
    if task == "single":
        if p.shape[1] < 2:
            return np.zeros(len(p))
        top2 = -np.sort(-p, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - top2[:, 1])
    t = np.asarray(thresholds if thresholds is not None else (0.5,) * p.shape[1], dtype=np.float64)[None, :]
    room = np.where(p < t, t, 1.0 - t)  # how far certainty lies on this side of the threshold
    closeness = 1.0 - np.abs(p - t) / np.maximum(room, 1e-6)
    return closeness.clip(0.0, 1.0).max(axis=1)


def choose(
    probabilities: np.ndarray,
    features: np.ndarray,
    count: int,
    *,
    task: str,
    thresholds: tuple[float, ...] | None = None,
    pool_factor: int = POOL_FACTOR,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` rows to label next, most uncertain first, and every row's uncertainty.

    ``probabilities`` (N, C) are the model's; ``features`` (N, D) its backbone's pooled
    features for the same rows. ``pool_factor`` 1 is plain uncertainty sampling."""
    if count < 1:
        raise InputError(f"--count must be at least 1, not {count}")
    scores = uncertainty(probabilities, task, thresholds)
    n = len(scores)
    # stable: equal scores keep input order, so the choice never depends on sort internals
    by_uncertainty = np.argsort(-scores, kind="stable")
    if count >= n:
        return by_uncertainty, scores
    pool = by_uncertainty[: min(n, max(count, pool_factor * count))]
    if len(pool) == count:
        return pool, scores
    x = _projected(np.asarray(features, dtype=np.float32)[pool])  # (P, d)
    groups = _weighted_kmeans(x, scores[pool], count, seed)  # (P,) group of each pool row
    picked = []
    for group in range(count):
        members = np.flatnonzero(groups == group)
        if len(members):
            picked.append(pool[members[np.argmax(scores[pool][members])]])
    chosen = set(picked)
    # an empty group (k-means may leave one) is made up by the next most uncertain rows
    picked += [row for row in pool if row not in chosen][: count - len(picked)]
    picked_array = np.array(picked)
    return picked_array[np.argsort(-scores[picked_array], kind="stable")], scores


def _projected(x: np.ndarray) -> np.ndarray:
    """Rows normalised to unit length (a feature vector's direction is what the head
    reads), centred, then onto their top ``PROJECTED_DIMS`` principal directions."""
    t = torch.from_numpy(x)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = t - t.mean(0)
    if t.shape[1] > PROJECTED_DIMS and t.shape[0] > PROJECTED_DIMS:
        _, _, v = torch.linalg.svd(t, full_matrices=False)  # (r, D) right singular vectors
        t = t @ v[:PROJECTED_DIMS].T  # (P, PROJECTED_DIMS)
    return t.numpy()


def _weighted_kmeans(x: np.ndarray, weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Group labels (N,) of a k-means of ``x`` (N, d), each row pulling its centre by its
    weight; k-means++ seeding drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    points = torch.from_numpy(x).double()
    w = torch.from_numpy(np.maximum(weights, 1e-6)).double()
    centres = [int(rng.integers(len(x)))]
    nearest = ((points - points[centres[0]]) ** 2).sum(1)
    for _ in range(1, k):
        chances = (nearest * w).numpy()
        total = chances.sum()
        new = int(rng.choice(len(x), p=chances / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(new)
        nearest = torch.minimum(nearest, ((points - points[new]) ** 2).sum(1))
    c = points[centres].clone()  # (k, d)
    groups = torch.zeros(len(x), dtype=torch.long)
    for step in range(KMEANS_ITERATIONS):
        distances = (points * points).sum(1, keepdim=True) - 2 * points @ c.T + (c * c).sum(1)[None, :]  # (N, k)
        new_groups = distances.argmin(1)
        if step and torch.equal(new_groups, groups):
            break
        groups = new_groups
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, groups, w)
        sums = torch.zeros_like(c).index_add_(0, groups, points * w[:, None])
        filled = mass > 0
        c[filled] = sums[filled] / mass[filled, None]
    return groups.numpy()


# --- over files, folders and datasets ---------------------------------------------


@dataclass
class Suggestions:
    names: list[str]  #: the chosen inputs, most worth labelling first
    guesses: list[list[str]]  #: the model's labels for each (top class, or tags at their thresholds)
    confidence: list[float]  #: the model's probability of its top class for each
    priority: list[float]  #: each one's uncertainty (see ``uncertainty``)
    considered: int  #: readable inputs ranked
    skipped: list[tuple[str, str]] = field(default_factory=list)  #: (input, why) of unreadable inputs
    #: for inputs from a capture folder, what the server answered (its prediction record); else None
    served: list[dict | None] = field(default_factory=list)


def suggest(
    predictor: Predictor,
    paths: list[str],
    count: int,
    *,
    split: str | None = None,
    pool_factor: int = POOL_FACTOR,
    seed: int = 0,
    progress: Progress = SILENT,
) -> Suggestions:
    """Rank every readable image of ``paths`` and choose ``count`` (see ``choose``).
    ``predictor`` must run the torch backend: the ranking needs the backbone's features
    beside the probabilities, from one forward pass."""
    if count < 1:
        raise InputError(f"--count must be at least 1, not {count}")
    model = predictor.torch_model
    if model is None:
        raise InputError("suggest needs the bundle's torch weights (the torch backend)")
    tasks, served = plan_with_captures(paths, split)
    names: list[str] = []
    probabilities, features = [], []
    skipped: list[tuple[str, str]] = []
    with progress.task("ranking", sum(t.size for t in tasks)) as advance:
        for batch in batched(_readable(tasks, skipped, advance, predictor), predictor.batch_size):
            logits, pooled = _forward(model, torch.stack([x for _, x in batch]))
            probabilities.append(predictor.probabilities(logits).numpy())
            features.append(pooled.numpy())
            names += [name for name, _ in batch]
            advance(len(batch))
    if not names:
        raise InputError("no readable image to rank", hint=f"{len(skipped)} inputs could not be read")
    probs = np.concatenate(probabilities)
    meta = predictor.meta
    chosen, scores = choose(probs, np.concatenate(features), count, task=meta.task, thresholds=meta.thresholds,
                            pool_factor=pool_factor, seed=seed)
    guesses = [predictor.decide(probs[row].tolist()) for row in chosen]
    chosen_names = [names[i] for i in chosen]
    served_for = _served_lookup(served)
    return Suggestions(chosen_names, guesses, [float(probs[i].max()) for i in chosen],
                       [float(scores[i]) for i in chosen], len(names), skipped,
                       [served_for(name) for name in chosen_names])


def plan_with_captures(paths: list[str], split: str | None = None) -> tuple[list[WorkItem], dict[str, Served]]:
    """``batch_predict.plan``, and by the image's input name where to find what the
    server answered for each captured image (``formats/captures.py``): a record read
    already (layout 2, from the folder's predictions parts), or a file read only for
    the images chosen (a layout-3 part's predictions member, a layout-1 sidecar)."""
    tasks: list[WorkItem] = []
    served: dict[str, Served] = {}
    others: list[str] = []
    for path in paths:
        if captures.is_capture_folder(path):
            tasks += plan(others, split) if others else []
            others = []
            folder = captures.list_folder(path)
            tasks += capture_tasks(folder)
            served.update(folder.records)
            served.update({name: _Sidecar(location) for name, location in folder.sidecars.items()})
            served.update({location: _Part(location) for location, _ in folder.parts})
        else:
            others.append(path)
    return tasks + (plan(others, split) if others else []), served


@dataclass(frozen=True)
class _Sidecar:
    location: str  #: a layout-1 image's JSON sidecar


@dataclass(frozen=True)
class _Part:
    location: str  #: a layout-3 part: what was served is its predictions member


#: what the server answered for a captured input: the record, or where to read it
Served = dict | _Sidecar | _Part


def _served_lookup(served: dict[str, Served]) -> Callable[[str], dict | None]:
    """``name -> record or None`` for the chosen inputs: reads each chosen image's
    sidecar, and each part holding a chosen image once."""
    parts: dict[str, dict[str, dict]] = {}

    def lookup(name: str) -> dict | None:
        entry = served.get(name)
        if entry is None and "/" in name:
            entry = served.get(name.rsplit("/", 1)[0])  # an image inside a part: the part's entry
        if isinstance(entry, _Sidecar):
            return captures.read_sidecar(entry.location)
        if isinstance(entry, _Part):
            if entry.location not in parts:
                parts[entry.location] = captures.part_records(entry.location)
            return parts[entry.location].get(name)
        return entry

    return lookup


def _readable(tasks: list[WorkItem], skipped: list[tuple[str, str]], advance, predictor: Predictor
              ) -> Iterator[tuple[str, torch.Tensor]]:
    for task in tasks:
        for name, data, error in task_inputs(task):
            try:
                if data is None:
                    raise UnreadableImageError(error or "unreadable")
                yield name, predictor.preprocess(data)  # (3, S, S)
            except UnreadableImageError as exc:
                skipped.append((name, exc.message))
                advance(1)


@torch.inference_mode()
def _forward(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> logits (B, C) and pooled features (B, D), from one backbone pass."""
    from tagmill.models import forward_features_pooled, head

    param = next(model.parameters())
    pooled = forward_features_pooled(model, batch.to(param.device, param.dtype))  # (B, D)
    return head(model)(pooled).float().cpu(), pooled.float().cpu()


# --- the labelling job on disk -----------------------------------------------------


def write_suggestions(found: Suggestions, location: str, paths: list[str], *, split: str | None = None,
                      multilabel: bool) -> str:
    """Write the CSV at ``location`` and copy the chosen images into ``<stem>_images/``
    beside it (ids are paths relative to the CSV's folder, as ``tagmill import`` reads
    them); returns the images folder. Every file is written atomically; the CSV last."""
    folder_name = storage.basename(location).rsplit(".", 1)[0] + "_images"
    parent = location[: len(location) - len(storage.basename(location))].rstrip("/\\") or "."
    folder = storage.join(parent, folder_name)
    storage.makedirs(folder)
    wanted = {name: rank for rank, name in enumerate(found.names)}
    ids: dict[str, str] = {}
    for name, data in _fetch(plan_with_captures(paths, split)[0], wanted):
        file_name = f"{wanted[name] + 1:05d}_{_file_name(name, data)}"
        storage.write_bytes(storage.join(folder, file_name), data)
        ids[name] = f"{folder_name}/{file_name}"
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    served = found.served or [None] * len(found.names)
    with_served = any(entry is not None for entry in served)
    writer.writerow(["id", "labels", "confidence", "priority", "source", *(SERVED_COLUMNS if with_served else ())])
    separator = TAG_SEPARATOR if multilabel else ""
    for name, guess, confidence, priority, entry in zip(found.names, found.guesses, found.confidence, found.priority,
                                                         served, strict=True):
        if name in ids:
            writer.writerow([ids[name], separator.join(guess) if multilabel else guess[0], f"{confidence:.4f}",
                             f"{priority:.4f}", name, *(_served_cells(entry) if with_served else ())])
    storage.write_bytes(location, text.getvalue().encode("utf-8"))
    return folder


def _served_cells(entry: dict | None) -> list[str]:
    if entry is None:
        return [""] * len(SERVED_COLUMNS)
    labels = entry.get("labels")
    confidence = entry.get("confidence")
    return [TAG_SEPARATOR.join(str(x) for x in labels) if isinstance(labels, list) else "",
            f"{confidence:.4f}" if isinstance(confidence, (int, float)) else "",
            str(entry.get("model_version") or ""), str(entry.get("captured_at") or "")]


def _fetch(tasks: list[WorkItem], wanted: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """The bytes of the ``wanted`` inputs: files read one by one, shards only when they hold one."""
    for task in tasks:
        if task.kind == "files":
            for location in task.items:
                if location in wanted:
                    yield location, storage.read_bytes(location)
        elif task.kind == "part" and any(name.startswith(task.items[0] + "/") for name in wanted):
            for name, data, _ in task_inputs(task):
                if name in wanted and data is not None:
                    yield name, data
        elif task.kind == "shard" and any(name.startswith(f"{task.dataset}:") for name in wanted):
            for name, data, _ in task_inputs(task):
                if name in wanted and data is not None:
                    yield name, data


def _file_name(name: str, data: bytes) -> str:
    """A safe file name for an input, keeping its image extension (or the format its
    bytes are in, for a dataset id or URL without one)."""
    base = name.rsplit(":", 1)[-1] if "://" not in name else name
    base = base.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")[:80] or "image"
    if has_image_extension(base):
        return base
    return base + image_extension(data)


def import_hint(location: str, *, multilabel: bool) -> str:
    """The ``tagmill import`` command that reads the labelled CSV back."""
    task = f"--multi-label --tag-sep '{TAG_SEPARATOR}'" if multilabel else "--single-label"
    return f"tagmill import {location} {task} --out DATASET"


__all__ = ["CAPTURE_MARKER", "POOL_FACTOR", "SIDECAR_SUFFIX", "Suggestions", "choose", "import_hint", "plan_with_captures",
           "suggest", "uncertainty", "write_suggestions"]
