"""One pass over a dataset's shards: what each image *is*, apart from what it shows.

For every image: its user id, split and labels (from the shard's metadata), its size,
a digest of its decoded pixels (equal digests: the same picture, whatever the file
bytes), a 64-bit perceptual hash (``imagehash.phash``: a DCT of the 32×32 grey image,
robust to resizing and recompression, which the pooled features are not: see
``duplicates.py``), a small colour thumbnail (``thumbnails.py``: what tells a copy from a
look-alike) and how much its pixels vary (a nearly blank image varies little).

Shards are read in parallel, one task per shard, by processes started from a fork
server (the caller holds torch's threads; forking a threaded process can hang, see
``dataset.torch_data``).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from tagmill import storage
from tagmill.dataset.manifest import Manifest
from tagmill.dataset.shards import iter_shard
from tagmill.errors import UnreadableImageError
from tagmill.progress import SILENT, Progress


@dataclass(frozen=True)
class ImageFacts:
    key: str  #: the sample's key in its shard (unique in the dataset)
    id: str  #: the user's id, as ``tagmill import --drop-ids`` / ``--relabel`` match it
    split: str
    labels: tuple[str, ...]
    width: int
    height: int
    digest: str  #: sha1 of the decoded RGB pixels and size ("" when undecodable)
    phash: int  #: 64-bit perceptual hash
    spread: float  #: standard deviation of the grey levels (0–255): near 0 means blank
    error: str = ""  #: why the image could not be decoded ("" when it could)
    thumbnail: bytes = b""  #: ``thumbnails.thumbnail`` of the image (b"" when undecodable)


def _facts(sample_key: str, data: bytes, meta: dict, split: str) -> ImageFacts:
    import imagehash

    from tagmill.dataset.images import decode, to_rgb
    from tagmill.doctor.thumbnails import thumbnail

    labels = tuple(meta.get("labels", ()))
    ident = str(meta.get("id", sample_key))
    try:
        image = to_rgb(decode(data))
    except UnreadableImageError as exc:
        return ImageFacts(sample_key, ident, split, labels, 0, 0, "", 0, 0.0, exc.message)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    digest = hashlib.sha1(f"{image.width}x{image.height}".encode() + pixels.tobytes()).hexdigest()
    grey = image.convert("L")
    spread = float(np.asarray(grey, dtype=np.float32).std())
    code = int(str(imagehash.phash(grey)), 16)
    return ImageFacts(sample_key, ident, split, labels, image.width, image.height, digest, code, spread,
                      thumbnail=thumbnail(image))


def _scan_shard(location: str, split: str) -> list[ImageFacts]:
    return [_facts(s.key, s.image, s.meta, split) for s in iter_shard(location)]


def scan_dataset(dataset: str, manifest: Manifest, *, workers: int | None = None,
                 progress: Progress = SILENT) -> list[ImageFacts]:
    """Facts of every image of every split, sorted by key."""
    jobs = [(storage.join(dataset, shard.name), split, shard.count)
            for split, info in manifest.splits.items() for shard in info.shards]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    facts: list[ImageFacts] = []
    total = sum(count for *_, count in jobs)
    with progress.task("checking images", total) as advance:
        if workers == 1:
            for location, split, count in jobs:
                facts.extend(_scan_shard(location, split))
                advance(count)
        else:
            context = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [(pool.submit(_scan_shard, location, split), count) for location, split, count in jobs]
                for future, count in futures:
                    facts.extend(future.result())
                    advance(count)
    facts.sort(key=lambda f: f.key)
    return facts


__all__ = ["ImageFacts", "scan_dataset"]
