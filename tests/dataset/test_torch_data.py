from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.dataset.shards import iter_shard
from tagmill.dataset.torch_data import ReaderSlot, ShardDataset, encode_labels
from tagmill.dataset.transforms import Preprocess, eval_transform, train_transform
from tagmill.errors import DatasetError, InputError
from tests import images
from tests.conftest import make_class_folders


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    make_class_folders(root / "photos", {"a": 20, "b": 17})
    out = root / "ds"
    # tiny shards so samples span several of them
    import_dataset(str(root / "photos"), str(out), ImportOptions(val_fraction=0.2, shard_bytes=4000))
    return str(out)


def test_every_sample_exactly_once_across_readers(packed):
    data = ShardDataset(packed, "train", eval_transform(Preprocess(input_size=32)), shuffle=True, seed=1)
    assert len(data.shards) > 2
    everything = [s.key for s in data.samples(ReaderSlot(0, 1))]
    assert len(everything) == len(data)
    shared = [s.key for i in range(3) for s in data.samples(ReaderSlot(i, 3))]
    assert Counter(shared) == Counter(everything)


def test_dataloader_workers_split_the_stream(packed):
    data = ShardDataset(packed, "train", eval_transform(Preprocess(input_size=32)))
    loader = DataLoader(data, batch_size=4, num_workers=2)
    keys = [k for _, _, batch_keys in loader for k in batch_keys]
    assert sorted(keys) == sorted(s.key for s in data.samples(ReaderSlot(0, 1)))
    images_, targets, _ = next(iter(DataLoader(data, batch_size=4)))
    assert images_.shape == (4, 3, 32, 32) and targets.dtype == torch.long


def test_epochs_reshuffle_reproducibly(packed):
    data = ShardDataset(packed, "train", eval_transform(Preprocess(input_size=32)), shuffle=True, seed=5)
    first = [k for _, _, k in data]
    again = [k for _, _, k in data]
    data.set_epoch(1)
    second = [k for _, _, k in data]
    assert first == again and first != second and sorted(first) == sorted(second)


def test_multi_hot_targets():
    index = {"a": 0, "b": 1, "c": 2}
    assert encode_labels(["c", "a"], index, "multi").tolist() == [1.0, 0.0, 1.0]
    assert encode_labels([], index, "multi").tolist() == [0.0, 0.0, 0.0]
    assert encode_labels(["b"], index, "single").item() == 1


@pytest.mark.parametrize("method", ["squish", "crop", "pad"])
def test_resize_methods_give_square_normalised_tensors(method):
    img = Image.open(__import__("io").BytesIO(images.jpeg_bytes(90, 30)))
    pre = Preprocess(input_size=40, resize_method=method)
    tensor = eval_transform(pre)(img.convert("RGB"))
    assert tensor.shape == (3, 40, 40)
    assert -1.01 <= tensor.min() and tensor.max() <= 1.01  # mean = std = 0.5 maps [0,1] to [-1,1]
    for aug in ("crop", "crop_color", "crop_color_transform"):
        assert train_transform(pre, aug)(img.convert("RGB")).shape == (3, 40, 40)


def test_pad_letterboxes_with_black_bars():
    white = Image.new("RGB", (100, 20), (255, 255, 255))
    tensor = eval_transform(Preprocess(input_size=50, resize_method="pad"))(white)
    assert tensor[:, 0, 25].tolist() == [-1.0, -1.0, -1.0]  # top bar: black
    assert tensor[:, 25, 25].tolist() == [1.0, 1.0, 1.0]  # centre: the white image


def test_bad_preprocess_values_are_input_errors():
    with pytest.raises(InputError):
        Preprocess(resize_method="stretch")
    with pytest.raises(InputError):
        train_transform(Preprocess(), "mixup")
    assert Preprocess.from_dict(Preprocess(input_size=64).as_dict()) == Preprocess(input_size=64)


def test_a_class_list_that_disagrees_with_the_shards_is_a_dataset_error(packed, tmp_path):
    """A class renamed in dataset.json by hand: every data-loader worker path ends in the
    corrupt-dataset error (exit 4) with its own message, not a KeyError or a lost tag."""
    import json
    import shutil

    from typer.testing import CliRunner

    from tagmill.cli import app
    from tagmill.errors import DatasetError

    edited = tmp_path / "edited"
    shutil.copytree(packed, edited)
    manifest = json.loads((edited / "dataset.json").read_text())
    renamed = manifest["classes"][0]
    manifest["classes"][0] = "renamed-by-hand"
    (edited / "dataset.json").write_text(json.dumps(manifest))
    dataset = ShardDataset(str(edited), "train", eval_transform(Preprocess(input_size=32)), shuffle=False)
    with pytest.raises(DatasetError) as caught:
        list(DataLoader(dataset, batch_size=4, num_workers=2))  # raised in a worker process, re-raised here
    assert caught.value.message.endswith(f"has label {renamed!r}, which is not in the class list of dataset.json: "
                                         "the manifest and its shards disagree")
    assert "re-import" in caught.value.hint and "Traceback" not in str(caught.value)

    result = CliRunner().invoke(app, ["train", str(edited), "--out", str(tmp_path / "run"), "--backbone", "test_efficientnet",
                                      "--no-pretrained", "--image-size", "32", "--workers", "2", "--epochs", "1"], env={"COLUMNS": "300"})
    assert result.exit_code == 4 and "the manifest and its shards disagree" in result.output, result.output
    assert "Traceback" not in result.output


def test_an_unknown_tag_is_never_dropped_silently():
    index = {"a": 0, "b": 1}
    assert encode_labels(["b"], index, "multi").tolist() == [0.0, 1.0]
    with pytest.raises(DatasetError, match="'c', which is not in the class list"):
        encode_labels(["a", "c"], index, "multi", "val-0000007")
    with pytest.raises(DatasetError, match="2 labels"):
        encode_labels(["a", "b"], index, "single")


def test_counts_edited_in_dataset_json_are_caught(packed, tmp_path):
    import json
    import shutil

    from tagmill.dataset.manifest import load_manifest

    def edited(name, change):
        copy = tmp_path / name
        shutil.copytree(packed, copy)
        manifest = json.loads((copy / "dataset.json").read_text())
        change(manifest["splits"]["train"])
        (copy / "dataset.json").write_text(json.dumps(manifest))
        return str(copy)

    def split_count(split):
        split["count"] += 1

    with pytest.raises(DatasetError, match="the train split's count is .*, its shards hold"):
        load_manifest(edited("split", split_count))

    def shard_count(split):  # the shard and the split agree with each other, not with the data
        split["shards"][0]["count"] += 1
        split["count"] += 1

    dataset = ShardDataset(edited("shard", shard_count), "train", eval_transform(Preprocess(input_size=32)), shuffle=False)
    with pytest.raises(DatasetError, match=r"holds \d+ samples, dataset.json says \d+"):
        list(DataLoader(dataset, batch_size=4, num_workers=0))


def test_small_passes_decode_in_process_and_large_ones_in_workers(monkeypatch):
    from tagmill.dataset.torch_data import IN_PROCESS_BELOW, MAX_DEFAULT_WORKERS, default_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_workers(IN_PROCESS_BELOW - 1) == 0
    assert default_workers(IN_PROCESS_BELOW) == MAX_DEFAULT_WORKERS
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_workers(10 * IN_PROCESS_BELOW) == 2


def test_readers_open_only_their_shards_and_get_equal_shares(packed, monkeypatch):
    opened: list[str] = []
    real = ShardDataset._opener
    monkeypatch.setattr(ShardDataset, "_opener", lambda self, location: (opened.append(location), real(self, location))[1])
    data = ShardDataset(packed, "train", eval_transform(Preprocess(input_size=32)), shuffle=True, seed=3)
    shard_of = {sample.key: shard for shard in data.shards for sample in iter_shard(shard)}
    for readers in (2, 3, len(data.shards), len(data.shards) + 2):
        shares, opens = [], 0
        for index in range(readers):
            opened.clear()
            keys = [sample.key for sample in data.samples(ReaderSlot(index, readers))]
            shares.append(len(keys))
            opens += len(opened)
            assert set(opened) == {shard_of[key] for key in keys}  # only shards holding some of its samples
        assert sum(shares) == len(data) and max(shares) - min(shares) <= 1  # equal shares: equal step counts
        assert opens <= len(data.shards) + readers - 1  # each shard once, plus one shared per boundary


def test_bytes_read_count_every_worker_and_stay_near_the_data_once(packed):
    import os

    transform = eval_transform(Preprocess(input_size=32))
    alone = ShardDataset(packed, "train", transform, shuffle=True, seed=2)
    assert len(list(alone)) == len(alone)
    # local shards seek over what a reader does not use (tar padding included): one reader
    # reads its members and their headers, less than the files hold
    assert 0 < alone.bytes_read <= sum(os.path.getsize(shard) for shard in alone.shards)

    shared = ShardDataset(packed, "train", transform, shuffle=True, seed=2)
    keys = [k for _, _, batch in DataLoader(shared, batch_size=4, num_workers=2) for k in batch]
    assert len(keys) == len(shared)
    # two worker processes, counted together: the same bytes, give or take the tar
    # headers of the samples the second one seeks past
    assert alone.bytes_read * 0.95 <= shared.bytes_read <= alone.bytes_read + 512 * len(shared)
