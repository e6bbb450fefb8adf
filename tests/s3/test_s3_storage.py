"""tagmill.storage and the shard cache against a real S3 endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tagmill import storage
from tagmill.dataset.shard_cache import ShardCache
from tagmill.errors import DatasetError, InputError, StorageError
from tests.s3.conftest import AuthServer, closed_port, s3_client


def test_write_read_list_exists_isdir(bucket):
    base = f"s3://{bucket}/data"
    storage.write_bytes(f"{base}/a.bin", b"\x00\x01binary")
    with storage.atomic_write(f"{base}/sub/b.txt") as handle:
        handle.write("héllo\n".encode())
    assert storage.read_bytes(f"{base}/a.bin") == b"\x00\x01binary"
    assert storage.read_text(f"{base}/sub/b.txt") == "héllo\n"
    with storage.open_read(f"{base}/a.bin") as handle:
        assert handle.read(2) == b"\x00\x01"
    assert storage.list_files(base) == ["a.bin", "sub/b.txt"]
    assert storage.exists(f"{base}/a.bin") and not storage.exists(f"{base}/nope.bin")
    assert storage.isdir(base) and storage.isdir(f"{base}/sub") and not storage.isdir(f"{base}/a.bin")
    storage.makedirs(f"{base}/new")  # S3 has no folders: nothing to do, and no error
    storage.remove(f"{base}/a.bin")
    assert storage.list_files(base) == ["sub/b.txt"]


def test_writes_are_seen_at_once_even_after_other_clients_change_the_bucket(bucket):
    base = f"s3://{bucket}/fresh"
    storage.write_bytes(f"{base}/one", b"1")
    assert storage.list_files(base) == ["one"]
    s3_client().put_object(Bucket=bucket, Key="fresh/two", Body=b"2")  # another client
    assert storage.list_files(base) == ["one", "two"]
    s3_client().delete_object(Bucket=bucket, Key="fresh/one")
    assert not storage.exists(f"{base}/one") and storage.list_files(base) == ["two"]
    storage.write_bytes(f"{base}/two", b"22")
    assert storage.read_bytes(f"{base}/two") == b"22"


def test_a_failed_atomic_write_leaves_no_object(bucket):
    location = f"s3://{bucket}/partial.bin"
    with pytest.raises(RuntimeError), storage.atomic_write(location) as handle:
        handle.write(b"half")
        raise RuntimeError("killed mid-write")
    assert not storage.exists(location)


def test_missing_bucket_and_missing_key_name_the_url(bucket):
    missing = f"s3://no-such-bucket-{bucket[-8:]}/prefix/dataset.json"
    for call in (storage.read_bytes, storage.exists, storage.isdir, storage.makedirs, storage.list_files):
        with pytest.raises(StorageError) as caught:
            call(missing)
        assert caught.value.message == f"{missing}: bucket does not exist", call.__name__
    with pytest.raises(StorageError, match="bucket does not exist"):
        storage.write_bytes(missing, b"x")
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(f"s3://{bucket}/no/such/key.json")
    assert caught.value.message == f"not found: s3://{bucket}/no/such/key.json"


def test_unreachable_endpoint_fails_fast_with_the_url(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    location = "s3://bucket/prefix/dataset.json"
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(location)
    assert time.monotonic() - started < 8  # botocore's defaults take ~10 s; ours one retry
    assert caught.value.message.startswith(f"{location}: cannot connect to http://127.0.0.1:")
    assert "AWS_ENDPOINT_URL" in (caught.value.hint or "")


def test_storage_options_set_the_endpoint_and_are_checked(moto_server, bucket, monkeypatch):
    storage.write_bytes(f"s3://{bucket}/x", b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    storage.set_storage_options({"endpoint_url": moto_server.endpoint, "use_ssl": "false"})
    assert storage.read_bytes(f"s3://{bucket}/x") == b"x"
    storage.set_storage_options({"config_kwargs": '{"read_timeout": 30}'})
    options = storage.s3_options(storage.current_storage_options())
    assert options["config_kwargs"]["read_timeout"] == 30 and options["config_kwargs"]["retries"]["max_attempts"] == 2
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # the user's own retry setting wins
    assert "retries" not in storage.s3_options({})["config_kwargs"]
    for bad in ({"endpoint": "x"}, {"anon": "maybe"}, {"config_kwargs": "[1]"}):
        with pytest.raises(InputError):
            storage.s3_options(bad)


def test_credentials_are_checked(auth_server: AuthServer):
    """moto with IAM checks: unknown key, wrong secret, and a user without permission."""
    location = f"s3://{auth_server.bucket}/ds/dataset.json"
    base = {"endpoint_url": auth_server.endpoint}
    storage.set_storage_options({**base, **auth_server.allowed})
    assert storage.read_bytes(location) == b"{}"
    cases = {
        "the access key id is not known to this endpoint": {"key": "AKIAUNKNOWN000000000", "secret": "x"},
        "the secret key does not match the access key id": {**auth_server.allowed, "secret": "wrong"},
        "access denied": auth_server.denied,
    }
    for reason, keys in cases.items():
        storage.set_storage_options({**base, **keys})
        with pytest.raises(StorageError) as caught:
            storage.read_bytes(location)
        assert caught.value.message == f"{location}: {reason}"


# --- the shard cache on S3 ---------------------------------------------------------


def _upload(bucket: str, key: str, data: bytes) -> tuple[str, str]:
    s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}", hashlib.sha256(data).hexdigest()


def test_shard_cache_reads_the_disk_after_the_first_download(bucket, tmp_path):
    url, sha = _upload(bucket, "ds/train-000000.tar", os.urandom(300_000))
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=10_000_000)
    first = cache.local_path(url, sha)
    assert cache.downloads == 1 and hashlib.sha256(Path(first).read_bytes()).hexdigest() == sha
    s3_client().delete_object(Bucket=bucket, Key="ds/train-000000.tar")
    again = ShardCache(str(tmp_path / "cache"), max_bytes=10_000_000)  # e.g. the next epoch's process
    assert again.local_path(url, sha) == first and again.hits == 1 and again.downloads == 0
    with pytest.raises(StorageError, match="not found"):  # a miss really goes to S3
        again.local_path(url.replace("000000", "000001"), "0" * 64)


def test_shard_cache_rejects_a_shard_that_does_not_match_its_sha256(bucket, tmp_path):
    url, _ = _upload(bucket, "ds/val-000000.tar", b"changed after import")
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=1_000_000)
    with pytest.raises(DatasetError, match="does not match its sha256"):
        cache.local_path(url, hashlib.sha256(b"what the manifest says").hexdigest())
    assert cache.entries() == [] and not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tmp-")]


def test_shard_cache_evicts_the_least_recently_used(bucket, tmp_path):
    shards = [_upload(bucket, f"ds/train-{i:06d}.tar", os.urandom(40_000)) for i in range(4)]
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=100_000)  # room for two
    paths = [cache.local_path(url, sha) for url, sha in shards[:2]]
    cache.local_path(*shards[0])  # used again: shard 1 is now the least recent
    cache.local_path(*shards[2])
    kept = {Path(e.path).name for e in cache.entries()}
    assert kept == {Path(paths[0]).name, f"{shards[2][1]}.tar"} and cache.size() <= 100_000
    big, big_sha = _upload(bucket, "ds/huge.tar", os.urandom(150_000))
    assert Path(cache.local_path(big, big_sha)).exists()  # larger than the cache: kept, alone
    assert [e.sha256 for e in cache.entries()] == [big_sha] and cache.evictions == 3


FETCH = textwrap.dedent("""
    import os, sys, time
    from tagmill.dataset.shard_cache import ShardCache
    directory, url, sha, go, ready = sys.argv[1:6]
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    cache = ShardCache(directory, max_bytes=50_000_000)
    path = cache.local_path(url, sha)
    print(cache.downloads, path)
""")


def test_two_processes_fetching_one_shard_download_it_once(bucket, tmp_path):
    url, sha = _upload(bucket, "ds/train-000000.tar", os.urandom(8_000_000))
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, str(tmp_path / "cache"), url, sha, str(go), str(flag)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.monotonic() + 60
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.01)  # both have imported tagmill: start them at the same instant
    go.touch()
    results = [proc.communicate(timeout=60) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    lines = [out.split() for out, _ in results]
    assert sorted(int(downloads) for downloads, _ in lines) == [0, 1]
    assert lines[0][1] == lines[1][1]
    assert hashlib.sha256(Path(lines[0][1]).read_bytes()).hexdigest() == sha
    assert [p for p in os.listdir(tmp_path / "cache") if not p.startswith("locks")] == [Path(lines[0][1]).name]
