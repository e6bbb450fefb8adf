"""The frozen stage's shortcut: run the backbone once, train the head many times.

While the backbone is frozen its output for a given input never changes, so computing
it every epoch is waste. The cache holds ``views`` augmented passes over the training
set (epoch e trains on view e % views) plus one plain pass over validation.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from tagmill import storage
from tagmill.dataset.manifest import Manifest
from tagmill.dataset.torch_data import ShardDataset, default_workers, shard_loader
from tagmill.dataset.transforms import Preprocess, eval_transform
from tagmill.errors import DatasetError
from tagmill.progress import SILENT, Progress
from tagmill.train.config import TrainConfig
from tagmill.train.device import autocast, inference_chunk, run_chunked
from tagmill.train.head_fit import RunningMoments
from tagmill.train.rows import Rows


@dataclass
class FeatureSet:
    features: torch.Tensor  #: (N, D) pooled backbone features
    targets: torch.Tensor  #: (N,) class indices, or (N, C) multi-hot
    keys: list[str]


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    precision: str,
    channels_last: bool,
    progress: Progress = SILENT,
    description: str = "caching features",
    total: int | None = None,
) -> FeatureSet:
    chunks, targets, keys = [], [], []
    for pooled, target, batch_keys in _pooled(model, loader, device, precision, channels_last, progress, description, total):
        chunks.append(pooled)
        targets.append(target)
        keys.extend(batch_keys)
    # Sorting by key makes the cache independent of data-loader worker interleaving.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return FeatureSet(_in_order(chunks, order), _in_order(targets, order), [keys[i] for i in order])


#: the importer names samples "{split}-{index:07d}": below 10^7 images their order as
#: strings (the order ``extract_features`` sorts rows in) is their index order
ORDERED_KEYS_BELOW = 10**7


@torch.inference_mode()
def extract_sample(
    model: torch.nn.Module,
    loader: DataLoader,
    rows: torch.Tensor,
    *,
    device: torch.device,
    precision: str,
    channels_last: bool,
    progress: Progress = SILENT,
    description: str = "computing features",
) -> tuple[FeatureSet, RunningMoments] | None:
    """What ``extract_features`` would give at positions ``rows`` (ascending), and the
    moments over every row, holding only those rows: a pass over a split too large to
    keep whole (the pooled features are ~4 KB per image). A row's position is its
    sample's index, read from its key; None when the keys are not the importer's
    ``{split}-{index}`` for indices 0..N-1 (N = ``len(loader.dataset)``), which only
    a hand-made dataset could have: the caller then extracts everything."""
    count = len(loader.dataset)
    if count >= ORDERED_KEYS_BELOW:
        return None
    wanted = np.zeros(count, dtype=bool)
    wanted[rows.numpy()] = True
    seen = np.zeros(count, dtype=bool)  # each index exactly once: 1 byte per image
    # the kept rows in one tensor each, not per-batch pieces: rows.py says why
    chunks, targets, keys, indices = Rows(len(rows)), Rows(len(rows)), [], []
    moments = RunningMoments()
    for pooled, target, batch_keys in _pooled(model, loader, device, precision, channels_last, progress, description, count):
        index = np.array([_index(key) for key in batch_keys], dtype=np.int64)
        if (index < 0).any() or (index >= count).any() or seen[index].any() or len(np.unique(index)) != len(index):
            return None
        seen[index] = True
        moments.add(pooled)
        keep = torch.from_numpy(wanted[index])
        if keep.any():
            chunks.add(pooled[keep])
            targets.add(target[keep])
            keys.extend(key for key, kept in zip(batch_keys, keep.tolist()) if kept)
            indices.extend(index[keep.numpy()].tolist())
    if not seen.all():
        return None
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return FeatureSet(chunks.tensor()[order], targets.tensor()[order], [keys[i] for i in order]), moments


class FeatureSpool:
    """One pass's pooled features and targets appended to two files as the batches come
    (data-loader order), instead of held in memory: ``write_spooled`` then writes the
    cache file from them in key order. Held meanwhile: the keys and a batch."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  #: the files are ``{prefix}.features`` and ``{prefix}.targets``
        self.keys: list[str] = []  #: in the order the rows were written
        self._specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}  #: part -> (dtype, shape of a row)
        self._files: dict[str, object] = {}

    def add(self, features: torch.Tensor, targets: torch.Tensor, keys: list[str]) -> None:
        """A batch: (B, D) features, (B,) or (B, C) targets, B keys."""
        for part, tensor in (("features", features), ("targets", targets)):
            array = np.ascontiguousarray(tensor.numpy())
            spec = (array.dtype, array.shape[1:])
            if part not in self._files:
                self._specs[part] = spec
                self._files[part] = open(f"{self.prefix}.{part}", "wb")
            elif spec != self._specs[part]:
                raise ValueError(f"a batch's {part} are {spec}, earlier ones {self._specs[part]}")
            self._files[part].write(array.data)
        self.keys.extend(keys)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def remove(self) -> None:
        self.close()
        for part in ("features", "targets"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{self.prefix}.{part}")

    def spec(self, part: str) -> tuple[np.dtype, tuple[int, ...]]:
        """(dtype, row shape) of ``part``; a pass with no rows is float32 (0,) as ``torch.empty(0)``."""
        return self._specs.get(part, (np.dtype(np.float32), ()))

    def rows(self, part: str) -> np.ndarray:
        """``part``'s rows in the order written, memory-mapped (read-only)."""
        dtype, shape = self.spec(part)
        if not self.keys:
            return np.zeros(0, dtype=dtype)
        return np.memmap(f"{self.prefix}.{part}", dtype=dtype, mode="r", shape=(len(self.keys), *shape))


@torch.inference_mode()
def spool_features(
    model: torch.nn.Module,
    loader: DataLoader,
    prefix: str,
    *,
    device: torch.device,
    precision: str,
    channels_last: bool,
    progress: Progress = SILENT,
    description: str = "caching features",
    total: int | None = None,
) -> FeatureSpool:
    """``extract_features`` written to ``prefix``'s files as it goes (``FeatureSpool``),
    for ``write_spooled``. ``extract_features`` holds every pass until the cache file is
    written, and the last one twice while it puts it in key order: about 1.5 times the
    cache (at 250k images × 848 features, 2 views, ~2.9 GB). bench/scale_data.py's 50k
    set, caching stage (anonymous PSS of the trainer and its loader workers): 1,112 MB
    in memory, 571 MB spooled, the same file."""
    spool = FeatureSpool(prefix)
    try:
        for pooled, target, batch_keys in _pooled(model, loader, device, precision, channels_last, progress, description, total):
            spool.add(pooled, target, batch_keys)
    except BaseException:
        spool.remove()
        raise
    spool.close()
    return spool


#: numbers gathered at once while a spool is put in key order (16 MB of float32)
SPOOL_CHUNK_ELEMENTS = 1 << 22
#: safetensors dtype names of what a feature cache holds (BF16: none, numpy has no such type)
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "F16": np.float16, "BF16": None}
#: the other way: the name a spooled dtype is written under
_SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items() if dtype is not None}


def write_spooled(path: str, views: list[FeatureSpool], val: FeatureSpool | None) -> None:
    """The feature cache file at local ``path``, as ``save_features`` would write it from
    the same passes (each set's rows in key order, the same tensor names, dtypes, shapes
    and key metadata), from spools: rows are gathered from the spooled files a chunk at a
    time, so no set is ever whole in memory. The spools are removed afterwards."""
    sets = [(f"train.{i}", view) for i, view in enumerate(views)] + ([("val", val)] if val is not None else [])
    try:
        orders = {name: np.array(sorted(range(len(spool.keys)), key=spool.keys.__getitem__), dtype=np.int64)
                  for name, spool in sets}
        keys = {name: [spool.keys[i] for i in orders[name]] for name, spool in sets}
        header: dict[str, object] = {}
        offset = 0
        for name, spool in sets:
            for part in ("features", "targets"):
                dtype, shape = spool.spec(part)
                if dtype not in _SAFETENSORS_NAMES:
                    raise ValueError(f"cannot cache {part} of dtype {dtype}")
                rows = len(spool.keys)
                size = rows * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                header[f"{name}.{part}"] = {"dtype": _SAFETENSORS_NAMES[dtype],
                                            "shape": [rows, *shape] if rows else [0], "data_offsets": [offset, offset + size]}
                offset += size
        header["__metadata__"] = {"train_keys": "\n".join(keys["train.0"]) if views else "",
                                  "val_keys": "\n".join(keys["val"]) if val is not None else ""}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data 8-byte aligned, as safetensors pads it
        partial = f"{path}.partial"
        with open(partial, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little"))
            handle.write(encoded)
            for name, spool in sets:
                for part in ("features", "targets"):
                    rows = spool.rows(part)
                    step = max(1, SPOOL_CHUNK_ELEMENTS // max(1, int(np.prod(rows.shape[1:], dtype=np.int64))))
                    for start in range(0, len(spool.keys), step):
                        handle.write(np.ascontiguousarray(rows[orders[name][start:start + step]]).data)
                    del rows
        os.replace(partial, path)
    finally:
        for _, spool in sets:
            spool.remove()


def _index(key: str) -> int:
    """The sample index in an importer key ("train-0000042" -> 42); -1 for another key."""
    digits = key.rpartition("-")[2]
    return int(digits) if digits.isdigit() and len(digits) == 7 else -1


def _pooled(model, loader, device, precision, channels_last, progress, description, total):
    """(B, D) pooled features on the CPU (float32), targets and keys of each batch of ``loader``."""
    from tagmill.models import forward_features_pooled
    from tagmill.models.fusion import fused_for_inference

    model.eval()
    chunk: int | None = None
    frozen: torch.nn.Module | None = None
    with progress.task(description, total) as advance:
        for images, target, batch_keys in loader:
            images = images.to(device, non_blocking=True)  # (B, 3, H, W)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            chunk = chunk or inference_chunk(device, images.shape[-1])
            # batch norms folded into their convolutions: the same features, ~25% sooner
            frozen = frozen or fused_for_inference(model, images[:2], forward_features_pooled)
            with autocast(device, precision):
                pooled = run_chunked(lambda x: forward_features_pooled(frozen, x), images, chunk)  # (B, D)
            yield pooled.float().cpu(), target, batch_keys
            advance(len(batch_keys))


def _in_order(batches: list[torch.Tensor], order: list[int]) -> torch.Tensor:
    """The rows of ``batches`` (concatenated) in ``order``, each batch freed once copied:
    the cache is held about once, not three times (batches, their concatenation, the
    reordered copy), which at 250k images is gigabytes."""
    if not batches:
        return torch.empty(0)
    destination = torch.empty(len(order), dtype=torch.long)
    destination[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    out = torch.empty((len(order), *batches[0].shape[1:]), dtype=batches[0].dtype)
    pending = collections.deque(batches)
    batches.clear()
    row = 0
    while pending:
        batch = pending.popleft()
        out[destination[row:row + len(batch)]] = batch
        row += len(batch)
    return out


def plain_features(
    dataset: str,
    manifest: Manifest,
    split: str,
    model: torch.nn.Module,
    preprocess: Preprocess,
    config: TrainConfig,
    device: torch.device,
    progress: Progress = SILENT,
    *,
    description: str = "computing features",
) -> FeatureSet:
    """Pooled backbone features (N, D) of every image of ``split``, unaugmented, by key.

    The one place plain features are acquired outside a training run (``lr-find``,
    ``doctor``): it is to become a lookup in a shared feature cache, so that commands
    run the backbone once between them."""
    workers = config.workers if config.workers is not None else default_workers(manifest.split(split).count)
    data = ShardDataset(dataset, split, eval_transform(preprocess), manifest=manifest, shuffle=False, seed=config.seed,
                        across_ranks=False)
    loader = shard_loader(data, batch_size=config.batch_size, workers=workers, pin_memory=device.type == "cuda")
    return extract_features(model, loader, device=device, precision="fp32", channels_last=False, progress=progress,
                            description=description, total=manifest.split(split).count)


def save_features(location: str, views: list[FeatureSet], val: FeatureSet | None) -> None:
    tensors = {}
    for i, view in enumerate(views):
        tensors[f"train.{i}.features"] = view.features.contiguous()
        tensors[f"train.{i}.targets"] = view.targets.contiguous()
    if val is not None:
        tensors["val.features"] = val.features.contiguous()
        tensors["val.targets"] = val.targets.contiguous()
    keys = {"train_keys": "\n".join(views[0].keys), "val_keys": "\n".join(val.keys) if val else ""}
    if storage.is_local(location):
        # straight to the file (no second copy of the cache in memory), then renamed into place
        path = location.removeprefix("file://")
        partial = f"{path}.partial"
        save_file(tensors, partial, metadata=keys)
        os.replace(partial, path)
        return
    storage.write_bytes(location, save_tensors(tensors, metadata=keys))


def load_features(location: str) -> tuple[list[FeatureSet], FeatureSet | None]:
    """The cache at ``location``. A local file is memory-mapped: its tensors are views of
    the file, paged in as they are read and dropped again under memory pressure, so a
    cache larger than the RAM left still works (copy-on-write: nothing writes to it)."""
    if storage.is_local(location):
        path = location.removeprefix("file://")
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
        tensors = {name: _mapped(path, 8 + header_len, spec) for name, spec in header.items() if name != "__metadata__"}
        metadata = header.get("__metadata__", {})
    else:
        data = storage.read_bytes(location)
        tensors = load_tensors(data)
        # safetensors keeps string metadata in its JSON header: 8-byte length, then the JSON
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    train_keys = metadata.get("train_keys", "").split("\n")
    views = []
    i = 0
    while f"train.{i}.features" in tensors:
        views.append(FeatureSet(tensors[f"train.{i}.features"], tensors[f"train.{i}.targets"], train_keys))
        i += 1
    val = None
    if "val.features" in tensors:
        val = FeatureSet(tensors["val.features"], tensors["val.targets"], metadata.get("val_keys", "").split("\n"))
    return views, val


def _mapped(path: str, data_start: int, spec: dict) -> torch.Tensor:
    """One tensor of a safetensors file, memory-mapped (safetensors' layout: a JSON header
    giving each tensor's dtype, shape and byte range after it)."""
    dtype = _DTYPES.get(spec["dtype"])
    if dtype is None:
        raise DatasetError(f"{path}: a feature cache holds no {spec['dtype']} tensors; delete it to recompute")
    begin, end = spec["data_offsets"]
    shape = tuple(spec["shape"])
    if end == begin:
        return torch.from_numpy(np.zeros(shape, dtype=dtype))
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=data_start + begin, shape=shape))
