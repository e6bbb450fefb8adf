import subprocess
import tarfile

import pytest
import webdataset as wds

from tagmill.dataset.shards import Sample, ShardWriter, iter_shard, sha256_of
from tagmill.errors import DatasetError
from tests import images


def write_samples(directory, n, max_bytes=1 << 30):
    writer = ShardWriter(str(directory), "train", max_bytes)
    for i in range(n):
        writer.write(Sample(f"train-{i:07d}", images.jpeg_bytes(seed=i), "jpg", {"id": str(i), "labels": [f"c{i % 2}"]}))
    return writer.close()


def test_round_trip_and_checksums(tmp_path):
    shards = write_samples(tmp_path, 5)
    assert [s.name for s in shards] == ["train-000000.tar"]
    samples = list(iter_shard(str(tmp_path / "train-000000.tar")))
    assert [s.meta["id"] for s in samples] == ["0", "1", "2", "3", "4"]
    assert samples[3].image == images.jpeg_bytes(seed=3)
    assert shards[0].sha256 == sha256_of(str(tmp_path / "train-000000.tar"))
    assert shards[0].count == 5


def test_shards_roll_over_at_the_size_limit(tmp_path):
    shards = write_samples(tmp_path, 6, max_bytes=4000)
    assert len(shards) > 1
    assert sum(s.count for s in shards) == 6
    keys = [s.key for shard in shards for s in iter_shard(str(tmp_path / shard.name))]
    assert keys == [f"train-{i:07d}" for i in range(6)]


def test_writing_twice_gives_identical_bytes(tmp_path):
    write_samples(tmp_path / "a", 3)
    write_samples(tmp_path / "b", 3)
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (tmp_path / "b/train-000000.tar").read_bytes()


def test_shards_are_standard_tar_files(tmp_path):
    write_samples(tmp_path, 2)
    listing = subprocess.run(["tar", "tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == ["train-0000000.jpg", "train-0000000.json", "train-0000001.jpg", "train-0000001.json"]


def test_webdataset_reads_the_shards(tmp_path):
    write_samples(tmp_path, 4)
    pipeline = wds.WebDataset(str(tmp_path / "train-000000.tar"), shardshuffle=False).decode("pil").to_tuple("jpg", "json")
    rows = list(pipeline)
    assert len(rows) == 4
    assert rows[1][0].size == (48, 32)
    assert rows[1][1]["labels"] == ["c1"]


def test_aborted_writer_leaves_no_shard(tmp_path):
    writer = ShardWriter(str(tmp_path), "train")
    writer.write(Sample("k", images.jpeg_bytes(), "jpg", {"labels": []}))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_shard_is_a_dataset_error(tmp_path):
    bad = tmp_path / "train-000000.tar"
    bad.write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError):
        list(iter_shard(str(bad)))


def test_tar_members_have_fixed_metadata(tmp_path):
    write_samples(tmp_path, 1)
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        member = tar.getmembers()[0]
    assert (member.mtime, member.uid, member.uname, member.mode) == (946684800, 0, "", 0o644)
