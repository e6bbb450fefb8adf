"""``tagmill predict``: a bundle over files, folders or packed datasets, at any scale.

The work is cut into ordered tasks — a block of files, or one shard of a dataset —
and each task is predicted in batches through the same :class:`Predictor` the server
uses. With ``nproc`` > 1 the tasks run in that many processes (one torch thread each);
results come back in task order, so the output order never depends on timing, and
every input appears exactly once. An unreadable file becomes a row with its error:
reported, never fatal to the batch.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from tagmill import storage
from tagmill.formats import captures
from tagmill.bundle.predictor import Prediction, Predictor
from tagmill.dataset.manifest import MANIFEST_NAME, load_manifest, shard_locations
from tagmill.dataset.shards import iter_shard
from tagmill.errors import InputError, StorageError
from tagmill.formats.base import has_image_extension
from tagmill.progress import SILENT, Progress

FILES_PER_TASK = 256


@dataclass(frozen=True)
class Row:
    name: str  #: the input's path or URL, or "DATASET:id" for a packed sample
    prediction: Prediction

    def as_dict(self) -> dict[str, Any]:
        return {"input": self.name, **self.prediction.as_dict()}


@dataclass(frozen=True)
class WorkItem:
    kind: Literal["files", "shard", "part"]
    items: tuple[str, ...]  #: file locations, or (shard location,), or (capture part location,)
    dataset: str = ""
    size: int = 0  #: inputs in this item (for progress)


@dataclass(frozen=True)
class Settings:
    bundle: str
    backend: str
    top_k: int | None
    threshold: float | None
    batch_size: int
    device: str = "cpu"  #: auto | cpu | cuda | cuda:N
    precision: str = "auto"  #: the ONNX graph: auto | fp32 | int8 (``Predictor.from_bundle``)


def plan(paths: list[str], split: str | None) -> list[WorkItem]:
    """The ordered tasks for ``paths`` (files, folders searched for images, datasets)."""
    tasks: list[WorkItem] = []
    files: list[str] = []
    for path in paths:
        if storage.isdir(path) and storage.exists(storage.join(path, MANIFEST_NAME)):
            tasks += file_tasks(files)
            files = []
            tasks += _dataset_tasks(path, split)
        elif captures.is_capture_folder(path):
            tasks += file_tasks(files)
            files = []
            tasks += capture_tasks(captures.list_folder(path))
        elif storage.isdir(path):
            files += [storage.join(path, *rel.split("/")) for rel in storage.list_files(path) if has_image_extension(rel)]
        elif storage.exists(path):
            files.append(path)
        else:
            raise InputError(f"no such file or folder: {path}")
    return tasks + file_tasks(files)


def file_tasks(files: list[str]) -> list[WorkItem]:
    """``files`` in order, FILES_PER_TASK to a task."""
    return [WorkItem("files", tuple(files[i : i + FILES_PER_TASK]), size=len(files[i : i + FILES_PER_TASK]))
            for i in range(0, len(files), FILES_PER_TASK)]


def capture_tasks(folder: captures.CaptureFolder) -> list[WorkItem]:
    """A ``serve --capture`` folder's images: its loose files, then a task per part."""
    return file_tasks(folder.files) + [WorkItem("part", (location,), size=count) for location, count in folder.parts]


def _dataset_tasks(dataset: str, split: str | None) -> list[WorkItem]:
    manifest = load_manifest(dataset)
    tasks = []
    for name, info in manifest.splits.items():
        if split in (None, name):
            for shard, location in zip(info.shards, shard_locations(dataset, manifest, name)):
                tasks.append(WorkItem("shard", (location,), dataset=dataset, size=shard.count))
    return tasks


def task_inputs(task: WorkItem) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, bytes or None, error) for every input of a task, in order."""
    if task.kind == "shard":
        for sample in iter_shard(task.items[0]):
            yield f"{task.dataset}:{sample.meta.get('id', sample.key)}", sample.image, None
        return
    if task.kind == "part":
        yield from captures.part_inputs(task.items[0])
        return
    for location in task.items:
        try:
            yield location, storage.read_bytes(location), None
        except StorageError as exc:
            yield location, None, str(exc)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last may be shorter), read lazily."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_task(predictor: Predictor, task: WorkItem, settings: Settings) -> list[Row]:
    rows: list[Row] = []
    for batch in batched(task_inputs(task), settings.batch_size):
        readable = [data for _, data, _ in batch if data is not None]
        predictions = iter(predictor.predict_bytes(readable, top_k=settings.top_k, threshold=settings.threshold) if readable else [])
        for name, data, error in batch:
            rows.append(Row(name, next(predictions) if data is not None else Prediction(error=error or "unreadable")))
    return rows


# One Predictor per worker process, loaded once by the pool initializer.
_worker: tuple[Predictor, Settings] | None = None


def _init_worker(settings: Settings) -> None:
    import torch

    global _worker
    torch.set_num_threads(1)  # N processes x 1 thread beat 1 process x N threads here
    _worker = (Predictor.from_bundle(settings.bundle, backend=settings.backend, device=settings.device,
                                      intra_op_threads=1, precision=settings.precision), settings)


def _run_in_worker(task: WorkItem) -> list[Row]:
    assert _worker is not None, "pool initializer did not run"
    return run_task(_worker[0], task, _worker[1])


def predict_all(
    settings: Settings,
    paths: list[str],
    *,
    split: str | None = None,
    nproc: int = 1,
    progress: Progress = SILENT,
    predictor: Predictor | None = None,
) -> Iterator[Row]:
    """Rows for every input of ``paths``, in input order."""
    if nproc < 1:
        raise InputError("--nproc must be >= 1")
    tasks = plan(paths, split)
    with progress.task("predicting", sum(t.size for t in tasks)) as advance:
        if nproc == 1 or len(tasks) <= 1:
            predictor = predictor or Predictor.from_bundle(settings.bundle, backend=settings.backend,
                                                           device=settings.device, precision=settings.precision)
            results: Iterable[list[Row]] = (run_task(predictor, task, settings) for task in tasks)
            for rows in results:
                yield from rows
                advance(len(rows))
            return
        context = multiprocessing.get_context("spawn")
        with context.Pool(nproc, initializer=_init_worker, initargs=(settings,)) as pool:
            for rows in pool.imap(_run_in_worker, tasks):  # imap keeps task order
                yield from rows
                advance(len(rows))


def write_rows(rows: Iterable[Row], location: str, fmt: str, classes: tuple[str, ...]) -> int:
    """Stream rows to ``location`` as json (one array), jsonl or csv; returns the count.

    Written through an atomic file: a reader never sees half an output, and an S3
    destination gets one upload at the end.
    """
    if fmt not in {"json", "jsonl", "csv"}:
        raise InputError(f"unknown output format {fmt!r}")
    count = 0
    with storage.atomic_write(location) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.writer(text) if fmt == "csv" else None
        if writer is not None:
            writer.writerow(["input", "labels", "error", *classes])
        if fmt == "json":
            text.write("[")
        for row in rows:
            if fmt == "csv":
                p = row.prediction
                writer.writerow([row.name, "|".join(p.labels), p.error or "", *(f"{x:.6f}" for x in p.probabilities)])
            elif fmt == "jsonl":
                text.write(json.dumps(row.as_dict()) + "\n")
            else:
                text.write(("," if count else "") + "\n  " + json.dumps(row.as_dict()))
            count += 1
        if fmt == "json":
            text.write("\n]\n")
        text.flush()
        text.detach()
    return count
