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
