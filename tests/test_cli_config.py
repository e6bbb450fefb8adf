"""``--config FILE`` for import, train and serve: option-keyed YAML or JSON, flags win,
and a run's own config.json repeats the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tagmill.errors import InputError, StorageError
from tests.cli import run
from tests.conftest import make_colour_classes

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8",
        "--workers", "0", "--frozen-epochs", "1", "--epochs", "1", "--cache-views", "1"]


def saved(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def test_a_run_made_from_a_saved_config_has_the_same_resolved_config(colour_dataset, tmp_path):
    # no --lr: the lr finder chooses it during the run, and the repeat must reuse it
    run("train", colour_dataset, "--out", str(tmp_path / "first"), *TINY, "--resize", "pad", "--time-budget", "10m",
        "--seed", "3")
    first = saved(tmp_path / "first")
    assert first["config"]["lr"] is not None and first["config"]["time_budget"] == 600.0
    run("train", "--config", str(tmp_path / "first" / "config.json"), "--out", str(tmp_path / "again"))
    assert saved(tmp_path / "again") == first
    first_rows = (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()
    again_rows = (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["val_loss"] for r in again_rows] == [json.loads(r)["val_loss"] for r in first_rows]


def test_flags_override_the_file_and_both_spellings_are_accepted(colour_dataset, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        f"dataset: {colour_dataset}\n"
        "backbone: test_efficientnet\npretrained: false\nimage-size: 40\nbatch_size: 8\nworkers: 0\n"
        "frozen-epochs: 1\ncache_views: 1\nlr: 0.02\nresize: crop\nseed: 5\n"
    )
    run("train", "--config", str(config), "--out", str(tmp_path / "run"), "--image-size", "48", "--seed", "7")
    resolved = saved(tmp_path / "run")
    assert resolved["dataset"] == colour_dataset
    got = resolved["config"]
    assert (got["image_size"], got["seed"]) == (48, 7)  # the flags
    assert (got["resize_method"], got["lr"], got["batch_size"], got["pretrained"]) == ("crop", 0.02, 8, False)  # the file


def test_import_reads_its_options_from_a_file(tmp_path):
    make_colour_classes(tmp_path / "src", 6)
    config = tmp_path / "import.yml"
    config.write_text(f"source: {tmp_path / 'src'}\nout: {tmp_path / 'ds'}\nval-fraction: 0.5\nkeep: [red, blue]\nmax_side: 32\n")
    run("import", "--config", str(config))
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["classes"] == ["blue", "red"] and manifest["splits"]["val"]["count"] == 6
    run("import", "--config", str(config), "--out", str(tmp_path / "ds2"), "--keep", "green,red")
    assert json.loads((tmp_path / "ds2" / "dataset.json").read_text())["classes"] == ["green", "red"]


@pytest.mark.parametrize("command", ["import", "train", "serve"])
def test_an_unknown_key_names_the_key_and_the_file_before_any_work(tmp_path, command):
    config = tmp_path / "options.yaml"
    config.write_text("workers: 1\nlearning_rate: 0.1\n")
    result = run(command, "--config", str(config), "--out", str(tmp_path / "out"), code=InputError.exit_code) \
        if command != "serve" else run(command, "--config", str(config), str(tmp_path / "bundle"), code=InputError.exit_code)
    assert "learning_rate" in result.output and str(config) in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "key"),
    [("image_size: big\n", "image_size"), ("image-size: 1.5\n", "image-size"), ("batch_size: true\n", "batch_size"),
     ("lr: [0.1, 0.2]\n", "lr"), ("pretrained: 3\n", "pretrained")],
)
def test_a_wrong_type_names_the_key_and_the_file(colour_dataset, tmp_path, text, key):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    result = run("train", colour_dataset, "--config", str(config), "--out", str(tmp_path / "run"), code=InputError.exit_code)
    assert key in result.output and str(config) in result.output
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_a_mapping_or_not_yaml_is_refused(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert str(listing) in run("serve", "--config", str(listing), "b", code=InputError.exit_code).output
    broken = tmp_path / "broken.json"
    broken.write_text("{\"port\": 80,}")
    assert "not a valid JSON file" in run("serve", "--config", str(broken), "b", code=InputError.exit_code).output
    missing = run("serve", "--config", str(tmp_path / "nope.yaml"), "b", code=StorageError.exit_code)
    assert "nope.yaml" in missing.output


def test_serve_reads_its_options_from_a_file(tmp_path, monkeypatch):
    import tagmill.serve.server

    seen = {}
    monkeypatch.setattr(tagmill.serve.server, "run_server", lambda config: seen.update(config=config))
    config = tmp_path / "serve.yaml"
    config.write_text("bundle: models/a\nport: 9001\nmax-batch: 4\nmax_wait_ms: 2\n")
    run("serve", "--config", str(config), "--port", "9002")
    got = seen["config"]
    assert (got.bundle, got.port, got.max_batch, got.max_wait_ms) == ("models/a", 9002, 4, 2.0)
