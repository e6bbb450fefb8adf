"""The feature cache on disk: memory-mapped where it is a local file, read whole from a URL."""

from __future__ import annotations

import torch

from tagmill.train.features import FeatureSet, load_features, save_features


def sets() -> tuple[list[FeatureSet], FeatureSet]:
    generator = torch.Generator().manual_seed(0)
    keys = [f"train-{i:07d}" for i in range(50)]
    views = [FeatureSet(torch.randn(50, 24, generator=generator), torch.randint(0, 3, (50,), generator=generator), keys)
             for _ in range(2)]
    val = FeatureSet(torch.randn(10, 24, generator=generator), (torch.rand(10, 4, generator=generator) > 0.5).float(),
                     [f"val-{i:07d}" for i in range(10)])
    return views, val


def test_a_local_cache_is_memory_mapped_and_reads_back_exactly(tmp_path) -> None:
    views, val = sets()
    location = str(tmp_path / "features.safetensors")
    save_features(location, views, val)
    assert not list(tmp_path.glob("*.partial"))  # written aside, then renamed into place
    loaded, loaded_val = load_features(location)
    for saved, back in zip([*views, val], [*loaded, loaded_val]):
        assert torch.equal(saved.features, back.features) and torch.equal(saved.targets, back.targets)
        assert saved.keys == back.keys
    with open("/proc/self/maps") as maps:  # the file is mapped into this process, not read into it
        assert location in maps.read()
    # copy-on-write: a caller that writes to it changes its own pages, never the file
    loaded[0].features[0, 0] = 1234.0
    assert load_features(location)[0][0].features[0, 0] != 1234.0


def test_a_cache_behind_a_url_is_read_whole(tmp_path) -> None:
    views, val = sets()
    location = f"file://{tmp_path}/features.safetensors"
    save_features(location, views, val)
    loaded, loaded_val = load_features(location)
    assert torch.equal(loaded[1].features, views[1].features) and torch.equal(loaded_val.targets, val.targets)


def test_a_spooled_cache_is_the_file_save_features_writes(tmp_path, monkeypatch) -> None:
    """Batches spooled to disk in loader order (workers interleave shards) and written in
    key order give the same cache as the in-memory sets, readable by safetensors itself;
    the spools are gone afterwards. Chunks of a few rows exercise the gathering."""
    from safetensors.torch import load_file

    from tagmill.train import features
    from tagmill.train.features import FeatureSpool, write_spooled

    monkeypatch.setattr(features, "SPOOL_CHUNK_ELEMENTS", 7 * 24)  # 7 feature rows per gathered chunk
    views, val = sets()
    spools = []
    for name, batches in (("train0", views[0]), ("train1", views[1]), ("val", val)):
        spool = FeatureSpool(str(tmp_path / f"features.safetensors.{name}"))
        order = torch.randperm(len(batches.keys), generator=torch.Generator().manual_seed(len(spools)))
        for part in order.split(8):  # batches of 8 in a shuffled order
            spool.add(batches.features[part], batches.targets[part], [batches.keys[i] for i in part.tolist()])
        spool.close()
        spools.append(spool)
    spooled = str(tmp_path / "features.safetensors")
    write_spooled(spooled, spools[:2], spools[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.safetensors"]
    reference = str(tmp_path / "reference.safetensors")
    save_features(reference, views, val)
    assert load_file(spooled).keys() == load_file(reference).keys()
    for name, tensor in load_file(reference).items():
        got = load_file(spooled)[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    loaded, loaded_val = load_features(spooled)
    assert [v.keys for v in loaded] == [v.keys for v in views] and loaded_val.keys == val.keys
    assert torch.equal(loaded[1].targets, views[1].targets) and torch.equal(loaded_val.features, val.features)
