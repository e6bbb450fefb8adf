"""Packed shards as a PyTorch IterableDataset, split exactly across ranks and workers.

Each epoch, every (rank, data-loader worker) pair — a *reader* — lays the split's
shards end to end in the same epoch-seeded order, a stream of N samples, and takes one
contiguous range of it: reader ``r`` of ``R`` owns positions ``[r·N/R, (r+1)·N/R)``.
So each sample is read exactly once per epoch across the whole job (no duplicates, no
drops), ranks get equal shares (±1 sample: the same number of steps), and a reader
opens only the shards its range touches: the job reads the data once per epoch. A range
that starts inside a shard seeks over the samples before it where the shard is a local
file (or in the shard cache), reading only their tar headers; where it is a pure
stream, it reads through them (at most one shard's head per reader). With 8 machines ×
4 workers reading from S3, that is each shard downloaded once per epoch instead of 32
times. Readers of one rank hold neighbouring ranges, so a rank's share is contiguous too.
"""

from __future__ import annotations

import functools
import gc
import io
import multiprocessing
import os
import random
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tagmill import storage
from tagmill.dataset.manifest import Manifest, load_manifest, shard_locations
from tagmill.dataset.shard_cache import ShardCache
from tagmill.dataset.shards import Sample, is_seekable, iter_shard
from tagmill.errors import DatasetError, InputError


@dataclass(frozen=True)
class ReaderSlot:
    """Which share of the samples this reader (rank × data-loader worker) owns."""

    index: int
    count: int

    def range(self, total: int) -> tuple[int, int]:
        """The positions [start, end) this reader owns in an epoch's stream of ``total`` samples."""
        return self.index * total // self.count, (self.index + 1) * total // self.count


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it runs, else torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def reader_slot(across_ranks: bool = True) -> ReaderSlot:
    rank, world = distributed_rank_world() if across_ranks else (0, 1)
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return ReaderSlot(rank * workers + worker, world * workers)


def encode_labels(labels: list[str], class_index: dict[str, int], task: str, key: str = "a sample") -> torch.Tensor:
    """single: LongTensor[] class index; multi: FloatTensor[C] multi-hot.

    A label outside the class list means dataset.json and its shards disagree (a class
    renamed or dropped by hand): DatasetError, never a silently dropped tag."""
    unknown = [label for label in labels if label not in class_index]
    if unknown or (task == "single" and len(labels) != 1):
        problem = f"label {unknown[0]!r}, which is not in the class list" if unknown else f"{len(labels)} labels"
        raise DatasetError(
            f"{key} has {problem} of dataset.json: the manifest and its shards disagree",
            hint="dataset.json was edited or comes from another import; re-import the data",
        )
    if task == "single":
        return torch.tensor(class_index[labels[0]], dtype=torch.long)
    target = torch.zeros(len(class_index), dtype=torch.float32)
    for label in labels:
        target[class_index[label]] = 1.0
    return target


def decode_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB") if img.mode != "RGB" else img


class ShardDataset(IterableDataset):
    """Yields ``(image_tensor, target, sample_key)`` for one split of a packed dataset."""

    def __init__(
        self,
        dataset: str,
        split: str,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        manifest: Manifest | None = None,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 512,
        across_ranks: bool = True,
        cache: ShardCache | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.split = split
        self.manifest = manifest or load_manifest(dataset)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        #: False: this process reads the whole split even under torchrun (e.g. rank 0's final report)
        self.across_ranks = across_ranks
        self.epoch = 0
        self.class_index = {name: i for i, name in enumerate(self.manifest.classes)}
        self.shards = shard_locations(dataset, self.manifest, split)
        #: a local read-through cache for shards behind URLs: epoch 2 reads disk, not network
        self.cache = cache
        self._info = dict(zip(self.shards, self.manifest.split(split).shards))  # location -> its ShardInfo
        # one slot per data-loader worker (each adds only to its own: no lock, which a
        # forkserver-started worker could not share), handed over when the workers start
        self._bytes_read = multiprocessing.RawArray("q", MAX_LOADER_WORKERS)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch (the same on every rank and worker)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.manifest.split(self.split).count

    def samples(self, slot: ReaderSlot) -> Iterator[Sample]:
        """This reader's share of the raw samples, in (shuffled) order; only the shards
        that hold part of it are opened."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        start, end = slot.range(len(self))
        position = 0  # of the shard's first sample in the epoch's stream
        for shard in order:
            count = self._info[shard].count
            if position + count <= start:
                position += count
                continue  # wholly before this reader's range: never opened
            if position >= end:
                break
            skip = max(0, start - position)  # the samples of this shard before the range
            seen = skip
            for sample in iter_shard(shard, self._opener, skip=skip):
                yield sample
                seen += 1
                if position + seen >= end:
                    break  # the rest of this shard belongs to the next reader
            # the step counts, progress bars and learning-rate schedule rely on the counts
            if seen != count and position + seen < end:
                raise DatasetError(
                    f"shard {shard} holds {seen} samples, dataset.json says {count}: "
                    "the manifest and its shards disagree",
                    hint="dataset.json was edited or comes from another import; re-import the data",
                )
            position += count

    def _opener(self, location: str) -> IO[bytes]:
        """Opens a shard (through the cache when there is one), counting the bytes read."""
        handle = (self.cache.open(location, self._info[location].sha256) if self.cache is not None
                  else storage.open_read(location))
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if worker >= MAX_LOADER_WORKERS:
            raise InputError(f"at most {MAX_LOADER_WORKERS} data-loading workers per process (--workers)")
        return _CountingReader(handle, self._bytes_read, worker)

    @property
    def bytes_read(self) -> int:
        """Shard bytes this dataset's readers have read so far (its worker processes included)."""
        return int(sum(self._bytes_read))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        slot = reader_slot(self.across_ranks)
        samples = self.samples(slot)
        if self.shuffle:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, random.Random(f"{self.seed}:{self.epoch}:{slot.index}"))
        task = self.manifest.task
        for sample in samples:
            image = self.transform(decode_rgb(sample.image))  # (3, H, W) float
            yield image, encode_labels(sample.meta["labels"], self.class_index, task, sample.key), sample.key


class _CountingReader(io.RawIOBase):
    """A read-only file that adds what it reads to its slot of a shared array (bytes
    seeked over are not read: a seekable shard's skipped samples cost nothing)."""

    def __init__(self, handle: IO[bytes], counters: Any, slot: int) -> None:
        super().__init__()
        self._handle, self._counters, self._slot = handle, counters, slot

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return is_seekable(self._handle)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._handle.read(len(buffer))
        buffer[: len(data)] = data
        self._counters[self._slot] += len(data)
        return len(data)

    def close(self) -> None:
        self._handle.close()
        super().close()


def _buffer_shuffle(items: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Approximate shuffle with a bounded buffer (streams never fit in memory)."""
    buffer: list[Sample] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


#: how long a new loader waits for exiting queue threads before it forks anyway: they
#: end within milliseconds once their loader has shut down; one that belongs to a loader
#: still running never ends, and costs this much once
SETTLE_TIMEOUT_S = 0.5


class ShardLoader(DataLoader):
    """A DataLoader whose worker processes start without inheriting a held lock.

    Under CPython 3.11 a forked child re-initialises the interpreter's thread-state lock
    only after it has used it: if another thread held that lock at the instant of the
    fork (a thread starting or ending, or a C++ thread entering Python), the child hangs
    for ever in ``PyOS_AfterFork_Child``. Seen twice in 2-rank torchrun jobs, when the
    validation loader forked right after a training epoch, leaving both ranks waiting.

    - In a distributed job, the communication library's threads call into Python at any
      moment, so workers start from a fork server: a single-threaded process started
      once, with this module (and torch) imported, so workers still start quickly.
    - In a single process, forking stays (no fork server to start, and user scripts
      without a main guard keep working); the only threads are the queue feeders of
      earlier loaders, which exit a moment after their loader shuts down, so a new
      loader joins them before it forks.

    Forked workers share the trainer's memory page by page until either side writes to
    a page. A full garbage collection writes to the header of every object it tracks,
    so one in a worker (or in the trainer while workers run) copies every page holding
    such an object: ~550,000 of them when ``tagmill train`` forks its epoch's workers,
    mostly the imported libraries. The collector runs a full pass only once enough
    objects have survived younger ones, so it strikes late in long passes only: none
    in a 9,000-image epoch, while the workers and the trainer rose together by ~300 MB
    in the last seconds of a 45,000-image one (bench/README.md, scale_data.py). So the
    objects alive when the workers start are frozen (``gc.freeze``: never scanned
    again) until the pass ends.
    """

    def _get_iterator(self):  # type: ignore[no-untyped-def]
        if self.num_workers == 0:
            return super()._get_iterator()
        if self.multiprocessing_context is None:
            _join_exiting_queue_threads(SETTLE_TIMEOUT_S)
        _freeze_heap()
        try:
            iterator = super()._get_iterator()  # the workers fork (or start) here
        except BaseException:
            _thaw_heap()
            raise
        return _thawed_when_done(iterator)


#: loader passes running with the heap frozen; it thaws when the last one ends
_frozen_passes = 0
_frozen_lock = threading.Lock()


def _freeze_heap() -> None:
    """Move every object the collector tracks to its permanent generation (see
    ShardLoader): each pass freezes again, so a pass started inside another also
    covers the objects made since."""
    global _frozen_passes
    with _frozen_lock:
        gc.freeze()
        _frozen_passes += 1


def _thaw_heap() -> None:
    """One pass has ended; the last one hands the objects back to the collector, so
    that cycles among them (which only it can free) are collected again."""
    global _frozen_passes
    with _frozen_lock:
        _frozen_passes -= 1
        if _frozen_passes == 0:
            gc.unfreeze()


class _thawed_when_done:  # noqa: N801 - used like the generator it stands for
    """``iterator``'s batches; the heap thaws when they run out, the pass fails, or it
    is abandoned (dropped, even before its first batch: a generator's ``finally``
    would not run then)."""

    def __init__(self, iterator: Iterator) -> None:
        self._iterator: Iterator | None = iterator

    def __iter__(self) -> _thawed_when_done:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            raise StopIteration
        try:
            return next(self._iterator)
        except BaseException:  # StopIteration included: the pass is over either way
            self._end()
            raise

    def _end(self) -> None:
        if self._iterator is not None:
            self._iterator = None  # the workers shut down as the loader's iterator goes
            _thaw_heap()

    def __del__(self) -> None:
        self._end()


def _join_exiting_queue_threads(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _follow_trainer(trainer_pid: int, worker_id: int) -> None:
    """worker_init_fn for fork-server workers: end this worker when the trainer ends.

    torch's workers watch their parent process, which is the fork server here; a rank
    killed with SIGKILL would leave its workers (and through them the fork server and
    the job's stderr) alive for ever. A thread waits on the trainer's pidfd instead."""
    try:
        pidfd = os.pidfd_open(trainer_pid)
    except ProcessLookupError:
        os._exit(1)  # already gone

    def wait_then_exit() -> None:
        select.select([pidfd], [], [])  # readable once the trainer has exited
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="tagmill-follow-trainer", daemon=True).start()


#: a pass over fewer samples than this decodes in the reading process: starting the
#: worker processes costs more than overlapping decoding with the forward pass saves
#: (240 images at 128 px on 2 cores: 5.7 s to train with 2 workers per pass, 4.5 s
#: without; 2,400 images of 28 px were no slower without them either)
IN_PROCESS_BELOW = 1000
#: the most data-loading processes chosen by default
MAX_DEFAULT_WORKERS = 4
#: the most a user may ask for (each has a slot in the shared bytes-read counters)
MAX_LOADER_WORKERS = 64


def default_workers(samples: int) -> int:
    """Data-loading processes for a pass over ``samples`` images when the user named none."""
    if samples < IN_PROCESS_BELOW:
        return 0
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)


def shard_loader(data: ShardDataset, *, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """The DataLoader every reader of shards uses (see :class:`ShardLoader`)."""
    options: dict = {}
    if workers > 0 and torch.distributed.is_available() and torch.distributed.is_initialized():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])  # no effect once the server runs
        options = {"multiprocessing_context": context, "worker_init_fn": functools.partial(_follow_trainer, os.getpid())}
    return ShardLoader(data, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, **options)
