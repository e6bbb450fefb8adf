"""ShardCache: a size-bounded, sha256-keyed local copy of remote shards.

Remote here is fsspec's memory:// filesystem (the S3 versions of these checks, with
two real processes, are in tests/s3/test_s3_storage.py).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from tagmill import storage
from tagmill.dataset.manifest import Manifest, SplitInfo
from tagmill.dataset.shard_cache import STALE_TEMP_SECONDS, ShardCache, cached_shard_locations
from tagmill.dataset.shards import ShardInfo
from tagmill.errors import DatasetError, InputError


@pytest.fixture
def remote():
    """A fresh memory:// folder, removed afterwards (the memory filesystem is global)."""
    base = f"memory://shard-cache-{uuid.uuid4().hex}"
    yield base
    fs = fsspec.filesystem("memory")
    if fs.exists(base):
        fs.rm(base, recursive=True)


def put(location: str, data: bytes) -> str:
    storage.write_bytes(location, data)
    return hashlib.sha256(data).hexdigest()


def test_local_paths_bypass_the_cache(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"local")
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=10)
    sha = hashlib.sha256(b"local").hexdigest()
    assert cache.local_path(str(shard), sha) == str(shard)
    assert cache.local_path(f"file://{shard}", sha) == str(shard)
    with cache.open(str(shard), sha) as handle:
        assert handle.read() == b"local"
    assert cache.entries() == [] and cache.downloads == 0


def test_first_read_downloads_then_the_disk_serves_it(remote, tmp_path):
    url = f"{remote}/train-000000.tar"
    sha = put(url, b"shard bytes" * 1000)
    cache = ShardCache(str(tmp_path), max_bytes=1 << 20)
    path = cache.local_path(url, sha)
    assert Path(path).read_bytes() == b"shard bytes" * 1000 and Path(path).name == f"{sha}.tar"
    storage.remove(url)  # gone from the "network": the cache still has it
    assert cache.local_path(url, sha) == path and (cache.downloads, cache.hits) == (1, 1)


def test_a_changed_shard_is_a_new_entry_never_the_stale_one(remote, tmp_path):
    url = f"{remote}/train-000000.tar"
    cache = ShardCache(str(tmp_path), max_bytes=1 << 20)
    old = cache.local_path(url, put(url, b"first import"))
    new = cache.local_path(url, put(url, b"re-imported"))
    assert old != new and Path(new).read_bytes() == b"re-imported" and cache.downloads == 2


def test_sha_mismatch_is_a_dataset_error_and_leaves_nothing(remote, tmp_path):
    url = f"{remote}/val-000000.tar"
    put(url, b"damaged after import")
    cache = ShardCache(str(tmp_path), max_bytes=1 << 20)
    with pytest.raises(DatasetError, match="does not match its sha256") as caught:
        cache.local_path(url, hashlib.sha256(b"as imported").hexdigest())
    assert url in caught.value.message
    assert cache.entries() == [] and sorted(os.listdir(tmp_path)) == ["locks"]
    with pytest.raises(DatasetError, match="no valid sha256"):
        cache.local_path(url, "../../etc/passwd")


def test_eviction_goes_by_last_use_and_spares_entries_in_use(remote, tmp_path):
    shards = [(f"{remote}/train-{i:06d}.tar", put(f"{remote}/train-{i:06d}.tar", bytes([i]) * 1000)) for i in range(4)]
    cache = ShardCache(str(tmp_path), max_bytes=2500)
    for url, sha in shards[:2]:
        cache.local_path(url, sha)
    cache.local_path(*shards[0])  # used again: shard 1 is the least recently used now
    cache.local_path(*shards[2])
    assert {e.sha256 for e in cache.entries()} == {shards[0][1], shards[2][1]}
    # an entry another process holds (downloading, opening) is never deleted under it
    with cache._entry_lock(shards[0][1]):
        cache.local_path(*shards[3])
    assert {e.sha256 for e in cache.entries()} == {shards[0][1], shards[3][1]}
    assert cache.evictions == 2


def test_an_open_shard_survives_its_eviction(remote, tmp_path):
    first, second = f"{remote}/a.tar", f"{remote}/b.tar"
    sha_a, sha_b = put(first, b"a" * 800), put(second, b"b" * 800)
    cache = ShardCache(str(tmp_path), max_bytes=1000)
    with cache.open(first, sha_a) as handle:
        cache.local_path(second, sha_b)  # evicts a.tar while it is open
        assert [e.sha256 for e in cache.entries()] == [sha_b]
        assert handle.read() == b"a" * 800


def test_threads_asking_for_one_shard_download_it_once(remote, tmp_path):
    url = f"{remote}/train-000000.tar"
    sha = put(url, os.urandom(2_000_000))
    caches = [ShardCache(str(tmp_path), max_bytes=1 << 30) for _ in range(6)]
    barrier = threading.Barrier(len(caches))
    paths: list[str] = []

    def fetch(cache: ShardCache) -> None:
        barrier.wait()
        paths.append(cache.local_path(url, sha))

    threads = [threading.Thread(target=fetch, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 1 and sum(c.downloads for c in caches) == 1 and sum(c.hits for c in caches) == 5
    assert hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest() == sha


def test_temporary_files_of_dead_downloads_are_cleaned(remote, tmp_path):
    stale, fresh = tmp_path / f".tmp-{'a' * 64}-dead", tmp_path / f".tmp-{'b' * 64}-live"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    url = f"{remote}/s.tar"
    ShardCache(str(tmp_path), max_bytes=100).local_path(url, put(url, b"z"))
    assert not stale.exists() and fresh.exists()


def test_cache_size_must_be_positive(tmp_path):
    with pytest.raises(InputError):
        ShardCache(str(tmp_path), max_bytes=0)


def _manifest(shards: list[ShardInfo]) -> Manifest:
    split = SplitInfo(count=len(shards), class_counts={"a": len(shards)}, shards=shards)
    return Manifest(task="single", classes=["a", "b"], splits={"train": split}, image={}, source={})


def test_cached_shard_locations(remote, tmp_path):
    datas = [b"0" * 600, b"1" * 600, b"2" * 600]
    shards = [ShardInfo(f"train-{i:06d}.tar", 1, len(d), put(f"{remote}/ds/train-{i:06d}.tar", d)) for i, d in enumerate(datas)]
    manifest = _manifest(shards)
    urls = [f"{remote}/ds/{s.name}" for s in shards]
    assert cached_shard_locations(f"{remote}/ds", manifest, "train", None) == urls
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=1300)  # two of the three fit
    located = cached_shard_locations(f"{remote}/ds", manifest, "train", cache)
    assert located[:2] == [str(tmp_path / "cache" / f"{s.sha256}.tar") for s in shards[:2]]
    assert located[2] == urls[2]  # streamed, rather than evicting shards 0 and 1
    assert [Path(p).read_bytes() for p in located[:2]] == datas[:2]
    local = str(tmp_path / "local-ds")
    assert cached_shard_locations(local, manifest, "train", cache) == [os.path.join(local, s.name) for s in shards]
    with pytest.raises(DatasetError, match="no 'val' split"):
        cached_shard_locations(f"{remote}/ds", manifest, "val", cache)
