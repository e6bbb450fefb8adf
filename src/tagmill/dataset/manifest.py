"""``dataset.json``: the manifest that makes a folder of shards a dataset.

It is written last, atomically, so its presence means the import finished. It carries
the schema version, task, classes, per-split counts and shards (with sha256), the
resize policy and the import report (every skipped input with its reason).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tagmill import storage
from tagmill.dataset.shards import ShardInfo, sha256_of
from tagmill.errors import DatasetError, StorageError

MANIFEST_NAME = "dataset.json"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class SplitInfo:
    count: int
    class_counts: dict[str, int]
    shards: list[ShardInfo]
    untagged: int = 0  #: multi-label images with no tag (all-negative examples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "class_counts": self.class_counts,
            "untagged": self.untagged,
            "shards": [s.as_dict() for s in self.shards],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitInfo:
        return cls(
            count=int(data["count"]),
            class_counts={str(k): int(v) for k, v in data["class_counts"].items()},
            shards=[ShardInfo(**s) for s in data["shards"]],
            untagged=int(data.get("untagged", 0)),
        )


@dataclass
class Manifest:
    task: str  #: "single" or "multi"
    classes: list[str]
    splits: dict[str, SplitInfo]
    #: how images were resized at import: {"max_side": 320} or {"max_side": null}
    image: dict[str, Any]
    #: where the data came from and with which options
    source: dict[str, Any]
    #: the import report: counts, skipped inputs with reasons, sampling steps
    report: dict[str, Any] = field(default_factory=dict)
    tagmill_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": "tagmill.dataset",
            "schema_version": self.schema_version,
            "tagmill_version": self.tagmill_version,
            "task": self.task,
            "classes": self.classes,
            "splits": {name: info.as_dict() for name, info in self.splits.items()},
            "image": self.image,
            "source": self.source,
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if data.get("format") != "tagmill.dataset" or not isinstance(version, int):
            raise DatasetError("not a tagmill dataset manifest (missing format/schema_version)")
        if version > SCHEMA_VERSION:
            raise DatasetError(
                f"dataset schema version {version} is newer than this tagmill understands ({SCHEMA_VERSION})",
                hint="upgrade tagmill",
            )
        try:
            manifest = cls(
                task=data["task"],
                classes=list(data["classes"]),
                splits={name: SplitInfo.from_dict(info) for name, info in data["splits"].items()},
                image=dict(data.get("image", {})),
                source=dict(data.get("source", {})),
                report=dict(data.get("report", {})),
                tagmill_version=str(data.get("tagmill_version", "")),
                schema_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"malformed dataset manifest: {exc!r}") from exc
        manifest._check_counts()
        return manifest

    def _check_counts(self) -> None:
        """Each split's count is the sum of its shards' (the shards' own counts are checked
        against what they hold when they are read: ``torch_data.ShardDataset``)."""
        for name, info in self.splits.items():
            in_shards = sum(shard.count for shard in info.shards)
            if info.count != in_shards or info.count < 0:
                raise DatasetError(
                    f"dataset.json is inconsistent: the {name} split's count is {info.count}, its shards hold {in_shards}",
                    hint="dataset.json was edited or comes from another import; re-import the data",
                )

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DatasetError(f"dataset has no {name!r} split (it has: {', '.join(self.splits) or 'none'})")
        return self.splits[name]


def manifest_location(dataset: str) -> str:
    return storage.join(dataset, MANIFEST_NAME)


def write_manifest(dataset: str, manifest: Manifest) -> None:
    text = json.dumps(manifest.as_dict(), indent=2, ensure_ascii=False) + "\n"
    storage.write_bytes(manifest_location(dataset), text.encode("utf-8"))


def load_manifest(dataset: str) -> Manifest:
    """Read a dataset's manifest; a folder without one is not a (finished) dataset."""
    location = manifest_location(dataset)
    try:
        text = storage.read_text(location)
    except StorageError as exc:
        if not storage.exists(location):
            raise DatasetError(
                f"{dataset} is not a tagmill dataset: it has no {MANIFEST_NAME}",
                hint="an import that was interrupted leaves no dataset.json; run `tagmill import` again",
            ) from exc
        raise
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{location} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def verify_shards(dataset: str, manifest: Manifest, *, checksums: bool = True) -> None:
    """Every shard the manifest lists exists (and matches its sha256): else DatasetError."""
    for split_name, info in manifest.splits.items():
        for shard in info.shards:
            location = storage.join(dataset, shard.name)
            if not storage.exists(location):
                raise DatasetError(f"dataset {dataset} is missing shard {shard.name} ({split_name} split)")
            if checksums and sha256_of(location) != shard.sha256:
                raise DatasetError(
                    f"shard {shard.name} of {dataset} does not match its sha256 in {MANIFEST_NAME}",
                    hint="the file was changed or damaged after import; re-import the data",
                )


def shard_locations(dataset: str, manifest: Manifest, split: str) -> list[str]:
    return [storage.join(dataset, shard.name) for shard in manifest.split(split).shards]


__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SPLITS",
    "Manifest",
    "SplitInfo",
    "load_manifest",
    "manifest_location",
    "shard_locations",
    "verify_shards",
    "write_manifest",
]

