"""``tagmill predict``: a bundle over files, folders or a packed dataset.

Inputs are streamed in batches through the same :class:`Predictor` the server uses.
An unreadable file becomes a row with its error — reported, never fatal to the batch.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tagmill import storage
from tagmill.bundle.predictor import Prediction, Predictor
from tagmill.dataset.manifest import MANIFEST_NAME, load_manifest, shard_locations
from tagmill.dataset.shards import iter_shard
from tagmill.errors import InputError, StorageError
from tagmill.formats.base import has_image_extension
from tagmill.progress import SILENT, Progress


@dataclass(frozen=True)
class Item:
    name: str  #: a path, URL, or "dataset:key" for a packed sample
    data: bytes | None
    error: str | None = None


@dataclass(frozen=True)
class Row:
    name: str
    prediction: Prediction

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.name, **self.prediction.as_dict()}


def collect_inputs(paths: list[str]) -> tuple[list[str], list[str]]:
    """(image files, packed datasets) named by ``paths`` (folders are searched)."""
    files: list[str] = []
    datasets: list[str] = []
    for path in paths:
        if storage.isdir(path):
            if storage.exists(storage.join(path, MANIFEST_NAME)):
                datasets.append(path)
            else:
                files += [storage.join(path, *rel.split("/")) for rel in storage.list_files(path) if has_image_extension(rel)]
        elif storage.exists(path):
            files.append(path)
        else:
            raise InputError(f"no such file or folder: {path}")
    return files, datasets


def count_dataset(dataset: str, split: str | None) -> int:
    manifest = load_manifest(dataset)
    return sum(info.count for name, info in manifest.splits.items() if split in (None, name))


def iter_items(files: list[str], datasets: list[str], split: str | None) -> Iterator[Item]:
    for location in files:
        try:
            yield Item(location, storage.read_bytes(location))
        except StorageError as exc:
            yield Item(location, None, str(exc))
    for dataset in datasets:
        manifest = load_manifest(dataset)
        for name in manifest.splits:
            if split not in (None, name):
                continue
            for shard in shard_locations(dataset, manifest, name):
                for sample in iter_shard(shard):
                    yield Item(f"{dataset}:{sample.meta.get('id', sample.key)}", sample.image)


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_all(
    predictor: Predictor,
    paths: list[str],
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    split: str | None = None,
    batch_size: int = 32,
    progress: Progress = SILENT,
) -> Iterator[Row]:
    files, datasets = collect_inputs(paths)
    total = len(files) + sum(count_dataset(d, split) for d in datasets)
    with progress.task("predicting", total) as advance:
        for batch in _batches(iter_items(files, datasets, split), batch_size):
            readable = [item for item in batch if item.data is not None]
            predictions = iter(predictor.predict_bytes([item.data for item in readable], top_k=top_k, threshold=threshold)) if readable else iter(())
            for item in batch:
                if item.data is None:
                    yield Row(item.name, Prediction(error=item.error or "unreadable"))
                else:
                    yield Row(item.name, next(predictions))
            advance(len(batch))


def write_rows(rows: list[Row], location: str, fmt: str, classes: tuple[str, ...]) -> None:
    """Write predictions as json (one array), jsonl (a line each) or csv (a column per class)."""
    if fmt == "json":
        text = json.dumps([r.as_dict() for r in rows], indent=2) + "\n"
    elif fmt == "jsonl":
        text = "".join(json.dumps(r.as_dict()) + "\n" for r in rows)
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["input", "labels", "error", *classes])
        for row in rows:
            p = row.prediction
            writer.writerow([row.name, "|".join(p.labels), p.error or "", *(f"{x:.6f}" for x in p.probabilities)])
        text = buffer.getvalue()
    else:
        raise InputError(f"unknown output format {fmt!r}")
    storage.write_bytes(location, text.encode("utf-8"))
