"""``tagmill import``: from what the user has to a packed, checked dataset.

    read source(s) ─► derive labels ─► --drop-ids/--relabel ─► keep/drop/sample
        ─► decode + resize (parallel) ─► check classes ─► split ─► write shards
        ─► write dataset.json (last)

Label rules, edits (``edits.py`` says why they sit between rules and sampling) and
sampling only look at metadata, so they run before any image is decoded (a balanced
2k-poster dataset out of 39k posters decodes 2k images). Splits run after decoding,
on the images that survived, so no split loses a class to a corrupt file.

A killed import continues where it stopped: decoding (the long step: half an hour for
250k stills) is journaled (``packing``) in a folder beside the output, under a
fingerprint of the sources' records and the options. The next import into the same
output with the same fingerprint reuses what was processed; with another fingerprint
it is refused (``--overwrite`` starts over), so no dataset ever mixes two imports. The
journal goes once ``dataset.json`` is written; that file is byte-identical to an
uninterrupted import's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tagmill import __version__, storage
from tagmill.dataset import edits as dataset_edits
from tagmill.dataset import rules as label_rules
from tagmill.dataset import sampling
from tagmill.dataset.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    SplitInfo,
    manifest_location,
    write_manifest,
)
from tagmill.dataset.packing import Staging, StagedImage, stage_images
from tagmill.dataset.shards import Sample, ShardWriter, shard_size
from tagmill.dataset.splits import assign_splits
from tagmill.errors import EmptyDatasetError, InputError
from tagmill.formats import ReadResult, SourceOptions, SourceRecord, Skip, open_reader
from tagmill.progress import SILENT, Progress

DEFAULT_VAL_FRACTION = 0.1
_SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
#: the folder (inside a local output) that journals an import in progress
JOURNAL_DIR = ".tagmill-import"
#: a shard's temporary file (``storage.atomic_write``), left behind by a killed import
_PARTIAL_SHARD = re.compile(r"^\.tmp-[^/]*-(train|val|test)-\d{6}\.tar$")


@dataclass(frozen=True)
class ImportOptions:
    """Everything ``tagmill import`` can be told, as one typed value."""

    source: SourceOptions = field(default_factory=SourceOptions)
    format: str = "auto"
    #: a second source, of the same format, that is the validation set (train.lst + val.lst)
    val_source: str | None = None
    #: the folder holding ``val_source``'s images, where it is not the train source's
    #: (SageMaker's ``validation`` channel beside ``train``; default: ``source.images``)
    val_images: str | None = None
    #: a text file of ids (one per line) that form the validation set
    val_list: str | None = None
    derive: tuple[str, ...] = ()
    otherwise: str = "other"
    #: ids to leave out: a text file (one a line) or a CSV with an id / id_b column (tagmill doctor's)
    drop_ids: str | None = None
    #: a CSV of id,labels whose labels replace the records' (after --derive, before sampling)
    relabel: str | None = None
    keep: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    skip_untagged: bool = False
    min_per_class: int = 0
    max_per_class: int | None = None
    balance: bool = False
    #: None: 0.1, or 0 when the source already names a validation set
    val_fraction: float | None = None
    test_fraction: float = 0.0
    seed: int = 0
    #: shorter side cap in pixels; None keeps the original size
    max_side: int | None = 320
    #: None: chosen per split (``shard_size``)
    shard_bytes: int | None = None
    workers: int | None = None
    overwrite: bool = False
    staging_dir: str | None = None


@dataclass
class ImportResult:
    location: str
    manifest: Manifest

    @property
    def report(self) -> dict[str, Any]:
        return self.manifest.report


#: options that change how an import runs, not what it produces (left out of its fingerprint)
_RUN_ONLY_OPTIONS = frozenset({"workers", "overwrite", "staging_dir"})


def import_dataset(
    source: str, out: str, options: ImportOptions | None = None, *, progress: Progress = SILENT,
    log: Callable[[str], None] = lambda line: None,
) -> ImportResult:
    options = options or ImportOptions()
    _check_options(options)
    journal = _journal_dir(out, options)
    _prepare_output(out, options.overwrite, journal)

    read = _read_sources(source, options)
    task = options.source.task or read.task or _infer_task(read.records)
    records, classes = read.records, list(read.classes or sorted({t for r in read.records for t in r.labels}))
    records = _apply_val_list(records, options.val_list, read)

    if options.derive:
        parsed = [label_rules.parse_rule(text) for text in options.derive]
        known = {t for r in records for t in r.labels} | set(classes)
        records, task, classes = label_rules.derive_labels(records, parsed, known, options.otherwise)
    records, classes, edits = _apply_edits(records, classes, task, options, read)
    records, steps = _sample(records, task, options)

    _claim_journal(journal, _fingerprint(source, options, records, task, classes), out)
    # a full disk while staging is a StorageError too; the journal keeps what was done
    with storage.storage_errors(journal), stage_images(
        records, options.max_side, workers=options.workers, progress=progress, staging_dir=options.staging_dir,
        journal_dir=journal, on_resume=lambda done: log(
            f"resuming an interrupted import: {done:,} of {len(records):,} images were already processed "
            "(--overwrite starts over)"),
    ) as staging:
        skipped = read.skipped + staging.skipped
        classes = [c for c in classes if any(c in img.record.labels for img in staging.images)]
        _check_classes(classes, staging.images, task)
        val_fraction = _val_fraction(options, staging.images)
        split_records = assign_splits(
            [img.record for img in staging.images],
            task,
            classes,
            val_fraction,
            options.test_fraction,
            options.seed,
        )
        _check_training_classes(classes, split_records["train"])
        by_record = {id(img.record): img for img in staging.images}
        try:
            splits = {
                name: _write_split(out, name, [by_record[id(r)] for r in split_records[name]], staging, classes, task, options, progress)
                for name in SPLITS
                if split_records.get(name)
            }
        except BaseException:
            # shards without a dataset.json are nobody's data: a failed import leaves none
            with contextlib.suppress(Exception):
                _remove_shards(out, keep=set())
            raise

    report = _report(read, records, staging.images, skipped, steps, edits, task, options)
    manifest = Manifest(
        task=task,
        classes=classes,
        splits=splits,
        image={"max_side": options.max_side, "resize": "shorter-side" if options.max_side else "none"},
        source={
            "location": source,
            "format": read.description,
            "val_source": options.val_source,
            "drop_ids": options.drop_ids,
            "relabel": options.relabel,
            "split": {"val_fraction": val_fraction, "test_fraction": options.test_fraction, "seed": options.seed},
        },
        report=report,
        tagmill_version=__version__,
    )
    write_manifest(out, manifest)
    _remove_stale_shards(out, manifest)
    shutil.rmtree(journal, ignore_errors=True)  # the dataset is whole: nothing left to resume
    return ImportResult(out, manifest)


def _check_options(options: ImportOptions) -> None:
    if options.max_side is not None and options.max_side < 16:
        raise InputError(f"--max-side {options.max_side} is too small (minimum 16 pixels)")
    if options.min_per_class < 0 or (options.max_per_class is not None and options.max_per_class < 1):
        raise InputError("--min-per-class must be >= 0 and --max-per-class >= 1")


def _prepare_output(out: str, overwrite: bool, journal: str) -> None:
    """Refuse to clobber a finished dataset; make an overwrite look unfinished at once."""
    manifest = manifest_location(out)
    if storage.exists(manifest):
        if not overwrite:
            raise InputError(f"{out} already holds a dataset ({MANIFEST_NAME} exists)", hint="pass --overwrite to replace it")
        # Removed first: if this import dies, the folder must not look like a finished dataset.
        storage.remove(manifest)
    if overwrite:
        shutil.rmtree(journal, ignore_errors=True)  # an interrupted import's work is not resumed either
    storage.makedirs(out)


def _journal_dir(out: str, options: ImportOptions) -> str:
    """Where an import into ``out`` journals its decoding: inside a local ``out``; for a
    URL, in a local folder named after it (staging must be random-access and local)."""
    if options.staging_dir is None and storage.is_local(out):
        return os.path.join(out.removeprefix("file://"), JOURNAL_DIR)
    digest = hashlib.sha256(out.encode()).hexdigest()[:16]
    base = options.staging_dir or os.path.join(os.path.expanduser("~"), ".cache", "tagmill", "imports")
    return os.path.join(base, f"{JOURNAL_DIR.lstrip('.')}-{digest}")


def _fingerprint(source: str, options: ImportOptions, records: list[SourceRecord], task: str, classes: list[str]) -> str:
    """What an import produces, in one hash: the records to decode (ids, labels, where each
    image is), the task, the classes and every option that changes the result."""
    settings = {k: v for k, v in asdict(options).items() if k not in _RUN_ONLY_OPTIONS}
    digest = hashlib.sha256(json.dumps({"source": source, "options": settings, "task": task, "classes": classes},
                                       sort_keys=True, default=str).encode())
    for record in records:
        digest.update(json.dumps([record.id, list(record.labels), record.image.describe(), record.split]).encode())
    return digest.hexdigest()


def _claim_journal(journal: str, fingerprint: str, out: str) -> None:
    """Start a journal, or continue one left by an import of the very same records and options."""
    path = os.path.join(journal, "fingerprint")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            if handle.read().strip() != fingerprint:
                raise InputError(
                    f"{out} holds an interrupted import of other sources or options; "
                    "it cannot be continued with these",
                    hint="run the interrupted command again to finish it, or pass --overwrite to start over",
                )
        return
    os.makedirs(journal, exist_ok=True)
    for stale in os.listdir(journal):  # a journal without a fingerprint never got past its first write
        os.remove(os.path.join(journal, stale))
    storage.write_bytes(path, fingerprint.encode())


def _read_sources(source: str, options: ImportOptions) -> ReadResult:
    read = open_reader(source, options.source, options.format).read()
    if options.val_source is None:
        return read
    val_options = replace(options.source, images=options.val_images) if options.val_images else options.source
    val = open_reader(options.val_source, val_options, options.format).read()
    val_records = [replace(r, id=f"val/{r.id}", split="val") for r in val.records]
    classes = read.classes
    if classes is not None and val.classes is not None:
        classes = classes + [c for c in val.classes if c not in classes]
    task = read.task if read.task == val.task else ("multi" if "multi" in (read.task, val.task) else None)
    return ReadResult(
        read.records + val_records,
        read.skipped + val.skipped,
        task,
        classes,
        f"{read.description}; validation: {val.description}",
    )


def _infer_task(records: list[SourceRecord]) -> str:
    return "multi" if any(len(r.labels) != 1 for r in records) else "single"


def _apply_val_list(records: list[SourceRecord], val_list: str | None, read: ReadResult) -> list[SourceRecord]:
    if val_list is None:
        return records
    wanted = {line.strip() for line in storage.read_text(val_list).splitlines() if line.strip()}
    known = {r.id for r in records}
    unknown = sorted(wanted - known)
    if unknown:
        read.skipped.append(
            Skip(val_list, "unknown-id", f"{len(unknown)} ids not in the source, e.g. {', '.join(unknown[:5])}")
        )
    return [replace(r, split="val") if r.id in wanted else r for r in records]


def _apply_edits(
    records: list[SourceRecord], classes: list[str], task: str, options: ImportOptions, read: ReadResult
) -> tuple[list[SourceRecord], list[str], dict[str, Any]]:
    """--drop-ids and --relabel, on the final ids and labels (``edits.py`` says why here)."""
    if options.drop_ids is None and options.relabel is None:
        return records, classes, {}
    edited = dataset_edits.apply_edits(
        records,
        classes,
        drop_ids=None if options.drop_ids is None else dataset_edits.read_drop_ids(options.drop_ids),
        drop_file=options.drop_ids or "",
        relabel=None if options.relabel is None else dataset_edits.read_relabel(options.relabel, task),  # type: ignore[arg-type]
        relabel_file=options.relabel or "",
        # label rules order their classes (the negative one first): new ones go last
        sort_classes=False if options.derive else None,
    )
    read.skipped.extend(edited.skipped)  # unknown ids, reported like --val-list's
    return edited.records, edited.classes, edited.report


def _sample(records: list[SourceRecord], task: str, options: ImportOptions) -> tuple[list[SourceRecord], list[dict[str, Any]]]:
    """The metadata-only filters, in a fixed order; each step is reported."""
    report = sampling.SamplingReport()
    if options.keep:
        records = report.add(sampling.keep_classes(records, options.keep, task))
    if options.drop:
        records = report.add(sampling.drop_classes(records, options.drop, task))
    if options.skip_untagged:
        records = report.add(sampling.drop_untagged(records))
    if options.min_per_class:
        records = report.add(sampling.min_per_class(records, options.min_per_class, task))
    if options.max_per_class:
        records = report.add(sampling.max_per_class(records, options.max_per_class, task, options.seed))
    if options.balance:
        records = report.add(sampling.balance(records, task, options.seed))
    return records, [{**step.as_dict(), "summary": step.describe()} for step in report.steps]


def _val_fraction(options: ImportOptions, images: list[StagedImage]) -> float:
    """An explicit validation set (--val-from, --val-list, a split column or val/ folder)
    means "this is my validation data": the rest stays training data unless asked."""
    if options.val_fraction is not None:
        return options.val_fraction
    return 0.0 if any(img.record.split == "val" for img in images) else DEFAULT_VAL_FRACTION


def _check_classes(classes: list[str], images: list[StagedImage], task: str) -> None:
    if not images:
        raise EmptyDatasetError("no usable image was found: the dataset would be empty", hint="see the skipped inputs above")
    if len(classes) < 2:
        found = classes[0] if classes else "none"
        raise EmptyDatasetError(
            f"the import would leave {len(classes)} class ({found}); a classifier needs at least 2",
            hint="check the label column, --keep/--drop and --min-per-class" if task == "single" else None,
        )


def _check_training_classes(classes: list[str], train: list[SourceRecord]) -> None:
    seen = {t for r in train for t in r.labels}
    missing = [c for c in classes if c not in seen]
    if missing:
        raise EmptyDatasetError(
            f"{len(missing)} class(es) have no training image: {', '.join(missing[:10])}",
            hint="add images, lower --val-fraction, or drop these classes with --min-per-class",
        )


def _write_split(
    out: str,
    split: str,
    images: list[StagedImage],
    staging: Staging,
    classes: list[str],
    task: str,
    options: ImportOptions,
    progress: Progress,
) -> SplitInfo:
    shard_bytes = options.shard_bytes or shard_size(sum(image.length for image in images))
    writer = ShardWriter(out, split, shard_bytes)
    counts: Counter[str] = Counter()
    untagged = 0
    try:
        # a full disk or a lost connection is a StorageError (exit 6), like every other I/O failure
        with storage.storage_errors(out), progress.task(f"writing {split} shards", len(images)) as advance:
            for index, image in enumerate(images):
                record = image.record
                meta = {"id": record.id, "labels": list(record.labels), "source": record.image.describe()}
                writer.write(Sample(f"{split}-{index:07d}", staging.read(image), image.ext, meta))
                counts.update(record.labels)
                untagged += not record.labels
                advance(1)
            shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    return SplitInfo(len(images), {c: counts.get(c, 0) for c in classes}, shards, untagged if task == "multi" else 0)


def _report(
    read: ReadResult,
    sampled: list[SourceRecord],
    imported: list[StagedImage],
    skipped: list[Skip],
    steps: list[dict[str, Any]],
    edits: dict[str, Any],
    task: str,
    options: ImportOptions,
) -> dict[str, Any]:
    reasons = Counter(s.reason for s in skipped)
    return {
        "inputs": len(read.records) + len(read.skipped),
        "listed": len(read.records),
        "selected": len(sampled),
        "imported": len(imported),
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "skipped": [s.as_dict() for s in skipped],
        "derived": list(options.derive),
        "edits": edits,
        "sampling": steps,
        "untagged": sum(1 for i in imported if not i.record.labels) if task == "multi" else 0,
    }


def _remove_stale_shards(out: str, manifest: Manifest) -> None:
    """Shards left by an earlier, larger import in the same folder are not ours any more,
    nor are the partial shards of an import that was killed (``kill -9`` runs no cleanup)."""
    _remove_shards(out, keep={s.name for info in manifest.splits.values() for s in info.shards})


def _remove_shards(out: str, *, keep: set[str]) -> None:
    """Every shard file in ``out`` (finished or partial) except those in ``keep``."""
    for name in storage.list_files(out):
        if (_SHARD_NAME.match(name) and name not in keep) or _PARTIAL_SHARD.match(name):
            storage.remove(storage.join(out, name))
