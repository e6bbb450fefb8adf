"""`tagmill import` through its public entry point, on real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tagmill.cli import app
from tagmill.dataset.manifest import load_manifest, verify_shards
from tagmill.dataset.shards import iter_shard
from tagmill.errors import EmptyDatasetError, InputError, SourceError
from tests.conftest import make_class_folders

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_folder_import_writes_a_checked_dataset_and_reports_skips(class_folders, tmp_path):
    out = tmp_path / "ds"
    result = run("import", str(class_folders), "--out", str(out), "--val-fraction", "0.2")
    assert result.exit_code == 0, result.output
    assert "skipped 5 of 35: 2 not-an-image, 2 unreadable, 1 no-class" in result.output
    manifest = load_manifest(str(out))
    verify_shards(str(out), manifest)
    assert manifest.task == "single" and manifest.classes == ["cat", "dog", "owl"]
    assert manifest.report["imported"] == 30

    reasons = sorted(s["reason"] for s in manifest.report["skipped"])
    assert reasons == ["no-class", "not-an-image", "not-an-image", "unreadable", "unreadable"]
    train, val = manifest.split("train"), manifest.split("val")
    assert train.count + val.count == 30
    assert val.class_counts == {"cat": 2, "dog": 2, "owl": 2}  # stratified: 20% of 12/10/8, rounded
    keys = [s.meta["id"] for shard in train.shards for s in iter_shard(str(out / shard.name))]
    assert len(keys) == train.count and len(set(keys)) == train.count


def test_reimport_with_the_same_seed_is_byte_identical(class_folders, tmp_path):
    for name in ("a", "b"):
        assert run("import", str(class_folders), "--out", str(tmp_path / name), "--seed", "7").exit_code == 0
    shards_a = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert shards_a and shards_a == sorted(p.name for p in (tmp_path / "b").glob("*.tar"))
    for name in shards_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_existing_dataset_is_not_overwritten_without_asking(class_folders, tmp_path):
    out = tmp_path / "ds"
    assert run("import", str(class_folders), "--out", str(out)).exit_code == 0
    again = run("import", str(class_folders), "--out", str(out))
    assert again.exit_code == InputError.exit_code
    assert "already holds a dataset" in again.output
    assert run("import", str(class_folders), "--out", str(out), "--overwrite", "--max-side", "16").exit_code == 0
    assert load_manifest(str(out)).image["max_side"] == 16


def test_one_class_is_not_a_dataset(tmp_path):
    make_class_folders(tmp_path / "src", {"only": 5})
    result = run("import", str(tmp_path / "src"), "--out", str(tmp_path / "ds"))
    assert result.exit_code == EmptyDatasetError.exit_code
    assert "at least 2" in result.output
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_missing_source_is_a_clear_error(tmp_path):
    result = run("import", str(tmp_path / "nope"), "--out", str(tmp_path / "ds"))
    assert result.exit_code == SourceError.exit_code
    assert "not found" in result.output and "nope" in result.output


def test_no_resize_keeps_original_pixels(tmp_path):
    make_class_folders(tmp_path / "src", {"a": 3, "b": 3}, size=(400, 360))
    assert run("import", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--no-resize").exit_code == 0
    samples = list(iter_shard(str(tmp_path / "ds" / "train-000000.tar")))
    assert samples[0].image == (tmp_path / "src" / Path(samples[0].meta["id"])).read_bytes()


def test_a_killed_import_never_leaves_a_complete_looking_dataset_and_resumes(tmp_path):
    src = make_class_folders(tmp_path / "src", {"a": 150, "b": 150}, size=(900, 1200))
    out = tmp_path / "ds"
    assert run("import", str(make_class_folders(tmp_path / "small", {"a": 2, "b": 2})), "--out", str(out)).exit_code == 0
    assert (out / "dataset.json").exists()
    journal = out / ".tagmill-import" / "staged.jsonl"
    cmd = [sys.executable, "-m", "tagmill", "import", str(src), "--out", str(out), "--overwrite", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 40):
        time.sleep(0.02)
    assert proc.poll() is None, "the import finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # a real kill -9: no cleanup runs
    proc.wait()
    done = journal.read_text().count("\n")
    assert 40 <= done < 300
    assert not (out / "dataset.json").exists()
    inspect = run("inspect", str(out), "--no-sheet")
    assert inspect.exit_code != 0 and "no dataset.json" in inspect.output
    # a killed writer's temporary shard, as storage.atomic_write names it (kill -9 runs no cleanup)
    (out / ".tmp-k1ll3d-train-000003.tar").write_bytes(b"half a shard")

    # other options cannot continue it: never a dataset that mixes two imports
    other = run("import", str(src), "--out", str(out), "--max-side", "32")
    assert other.exit_code == InputError.exit_code and "interrupted import of other sources or options" in other.output
    # the same command (another worker count is fine) continues it ...
    resumed = run("import", str(src), "--out", str(out), "--workers", "2")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming an interrupted import: {done:,} of 300 images" in resumed.output
    assert json.loads((out / "dataset.json").read_text())["report"]["imported"] == 300
    assert not list(out.glob(".tmp-*")) and not (out / ".tagmill-import").exists()
    # ... to exactly what an uninterrupted import writes
    assert run("import", str(src), "--out", str(tmp_path / "whole")).exit_code == 0
    assert (out / "dataset.json").read_bytes() == (tmp_path / "whole" / "dataset.json").read_bytes()


def test_overwrite_drops_an_interrupted_imports_journal(tmp_path):
    src = make_class_folders(tmp_path / "src", {"a": 3, "b": 3})
    out = tmp_path / "ds"
    (out / ".tagmill-import").mkdir(parents=True)
    (out / ".tagmill-import" / "fingerprint").write_text("another import")
    refused = run("import", str(src), "--out", str(out))
    assert refused.exit_code == InputError.exit_code and "--overwrite" in refused.output
    assert run("import", str(src), "--out", str(out), "--overwrite").exit_code == 0
    assert json.loads((out / "dataset.json").read_text())["report"]["imported"] == 6


def test_a_full_disk_is_a_storage_error_and_leaves_no_partial_shard(tmp_path):
    """A real 3 MB tmpfs filled by shards of incompressible images (needs root to mount)."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        rng = np.random.default_rng(0)
        for c in ("a", "b"):
            (tmp_path / "src" / c).mkdir(parents=True)
            for i in range(20):  # 40 × ~120 KB of noise: PNG cannot compress it below the 3 MB
                Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(tmp_path / "src" / c / f"{i}.png")
        cmd = [sys.executable, "-m", "tagmill", "import", str(tmp_path / "src"), "--out", str(small / "ds"),
               "--shard-size-mb", "1", "--workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
        assert result.returncode == 6, result.stderr  # StorageError
        assert "no space left to write" in result.stderr and "Traceback" not in result.stderr
        # no partial shard, and no finished ones without a dataset.json: at most the journal of
        # what was decoded, for the same command to continue once there is room
        assert [p.name for p in (small / "ds").iterdir()] in ([], [".tagmill-import"])
    finally:
        subprocess.run(["umount", str(small)], check=False)


def run_wide(*args: str):
    """``run``, on a console wide enough that no summary line wraps (they hold tmp paths)."""
    return runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "1000"})


def _shard_meta(out: Path) -> dict[str, dict]:
    """Every imported image's shard meta, by id, with the split it was written to."""
    manifest = load_manifest(str(out))
    return {
        s.meta["id"]: {**s.meta, "split": split}
        for split, info in manifest.splits.items()
        for shard in info.shards
        for s in iter_shard(str(out / shard.name))
    }


def test_drop_ids_and_relabel_from_doctor_files_edit_the_reimport(tmp_path):
    src = make_class_folders(tmp_path / "src", {"cat": 6, "dog": 6})
    duplicates = tmp_path / "duplicates.csv"  # the doctor's pairs: the second of each is dropped
    duplicates.write_text(
        "id_a,split_a,id_b,split_b,kind,similarity\n"
        "cat/000.jpg,train,cat/001.jpg,train,duplicate,0.999\n"
        "dog/000.jpg,train,dog/005.jpg,val,duplicate,0.998\n"
        "dog/000.jpg,train,gone/404.jpg,train,duplicate,0.990\n"
    )
    relabel = tmp_path / "fix.csv"
    relabel.write_text("id,labels\ndog/002.jpg,cat\ndog/005.jpg,cat\ncat/003.jpg,cat\n")
    out = tmp_path / "ds"
    result = run_wide("import", str(src), "--out", str(out), "--workers", "1", "--val-fraction", "0.25",
                      "--drop-ids", str(duplicates), "--relabel", str(relabel))
    assert result.exit_code == 0, result.output
    assert f"  dropped 2 images listed in {duplicates} (1 listed ids not in the source)\n" in result.output
    assert f"  relabelled 1 image from {relabel} (1 already so labelled; 1 dropped instead" in result.output

    meta = _shard_meta(out)
    assert len(meta) == 10 and not {"cat/001.jpg", "dog/005.jpg"} & set(meta)
    assert meta["dog/002.jpg"]["labels"] == ["cat"]
    assert meta["dog/001.jpg"]["labels"] == ["dog"] and meta["cat/003.jpg"]["labels"] == ["cat"]

    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["classes"] == ["cat", "dog"]
    counts = {c: sum(s["class_counts"][c] for s in manifest["splits"].values()) for c in manifest["classes"]}
    assert counts == {"cat": 6, "dog": 4}  # 6 - 1 dropped + 1 relabelled; 6 - 1 dropped - 1 relabelled
    report = manifest["report"]
    assert report["edits"] == {
        "drop_ids": {"file": str(duplicates), "listed": 3, "dropped": 2, "unknown": 1},
        "relabel": {"file": str(relabel), "listed": 3, "relabelled": 1, "unchanged": 1, "unknown": 0, "dropped_instead": 1},
    }
    assert report["imported"] == report["selected"] == 10
    assert [s for s in report["skipped"] if s["reason"] == "unknown-id"] == [
        {"source": str(duplicates), "reason": "unknown-id", "detail": "1 ids not in the source, e.g. gone/404.jpg"}
    ]
    assert manifest["source"]["drop_ids"] == str(duplicates) and manifest["source"]["relabel"] == str(relabel)


def test_relabel_reaches_val_prefixed_ids_of_a_multi_label_import(tmp_path):
    from tests.formats.csv_files import add_images

    add_images(tmp_path / "img", *(f"{n}.jpg" for n in ("t1", "t2", "t3", "t4", "v1", "v2")))
    (tmp_path / "train.csv").write_text('id,tags\nt1,"sky, sea"\nt2,sea\nt3,sky\nt4,"sea, sky"\n')
    (tmp_path / "val.csv").write_text('id,tags\nv1,"sky, sea"\nv2,sea\n')
    # the doctor names validation images as the dataset does: val/<id>; a multi-label cell splits like the source's
    (tmp_path / "fix.csv").write_text('id,labels\nval/v1,\nt2,"sea | moon"\nv2,sky\n')
    (tmp_path / "outliers.csv").write_text("id,split,score\nt3,train,0.97\n")
    out = tmp_path / "ds"
    result = run("import", str(tmp_path / "train.csv"), "--images", str(tmp_path / "img"), "--out", str(out),
                 "--val-from", str(tmp_path / "val.csv"), "--workers", "1",
                 "--relabel", str(tmp_path / "fix.csv"), "--drop-ids", str(tmp_path / "outliers.csv"))
    assert result.exit_code == 0, result.output
    meta = _shard_meta(out)
    assert set(meta) == {"t1", "t2", "t4", "val/v1", "val/v2"}
    assert meta["val/v1"]["labels"] == [] and meta["val/v1"]["split"] == "val"
    assert meta["t2"]["labels"] == ["sea", "moon"]
    manifest = load_manifest(str(out))
    assert manifest.task == "multi" and manifest.classes == ["moon", "sea", "sky"]
    assert manifest.split("val").untagged == 1
    assert manifest.report["edits"]["relabel"] == {
        "file": str(tmp_path / "fix.csv"), "listed": 3, "relabelled": 2, "unchanged": 0, "unknown": 1, "dropped_instead": 0,
    }
    assert manifest.report["edits"]["drop_ids"]["dropped"] == 1


def test_a_drop_file_of_other_ids_fails_before_anything_is_written(tmp_path):
    src = make_class_folders(tmp_path / "src", {"cat": 3, "dog": 3})
    (tmp_path / "drop.txt").write_text("# ids from another dataset\n000.jpg\n001.jpg\n")
    result = run_wide("import", str(src), "--out", str(tmp_path / "ds"), "--drop-ids", str(tmp_path / "drop.txt"))
    assert result.exit_code == InputError.exit_code
    assert "lists 2 id(s), none of them in the source" in result.output and "cat/000.jpg" in result.output
    assert not list((tmp_path / "ds").glob("*"))
