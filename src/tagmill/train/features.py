"""The frozen stage's shortcut: run the backbone once, train the head many times.

While the backbone is frozen its output for a given input never changes, so computing
it every epoch is waste. The cache holds ``views`` augmented passes over the training
set (epoch e trains on view e % views) plus one plain pass over validation.
"""

from __future__ import annotations

import collections
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
    chunks, targets, keys, indices = [], [], [], []
    moments = RunningMoments()
    for pooled, target, batch_keys in _pooled(model, loader, device, precision, channels_last, progress, description, count):
        index = np.array([_index(key) for key in batch_keys], dtype=np.int64)
        if (index < 0).any() or (index >= count).any() or seen[index].any() or len(np.unique(index)) != len(index):
            return None
        seen[index] = True
        moments.add(pooled)
        keep = torch.from_numpy(wanted[index])
        if keep.any():
            chunks.append(pooled[keep])
            targets.append(target[keep])
            keys.extend(key for key, kept in zip(batch_keys, keep.tolist()) if kept)
            indices.extend(index[keep.numpy()].tolist())
    if not seen.all():
        return None
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return FeatureSet(_in_order(chunks, order), _in_order(targets, order), [keys[i] for i in order]), moments


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


#: safetensors dtype names of what a feature cache holds
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "F16": np.float16, "BF16": None}


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
