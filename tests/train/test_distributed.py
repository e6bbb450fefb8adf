"""Real multi-process training: torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ARGS = ["--device", "cpu", "--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8",
        "--workers", "1", "--frozen-epochs", "1", "--epochs", "2", "--cache-views", "1", "--lr", "0.01"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tagmill(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tagmill", *args], env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sharded_colours(tmp_path_factory) -> str:
    """colour_dataset's images cut into small shards, so that readers have several each."""
    from tagmill.dataset.importer import ImportOptions, import_dataset
    from tests.conftest import make_colour_classes

    root = tmp_path_factory.mktemp("sharded")
    make_colour_classes(root / "src", 20)
    import_dataset(str(root / "src"), str(root / "ds"), ImportOptions(val_fraction=0.2, shard_bytes=24_000))
    return str(root / "ds")


@pytest.fixture(scope="module")
def single_and_double(sharded_colours, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    one = tagmill("train", sharded_colours, "--out", str(root / "one"), *ARGS)
    assert one.returncode == 0, one.stderr[-3000:]
    two = tagmill("train", sharded_colours, "--out", str(root / "two"), "--nproc", "2", *ARGS)
    assert two.returncode == 0, two.stderr[-3000:]
    return root / "one", root / "two"


def test_two_processes_see_every_sample_exactly_once_each_reading_its_shards(single_and_double, sharded_colours):
    from tagmill.dataset.manifest import load_manifest, shard_locations

    one, two = single_and_double
    single, double = rows(one), rows(two)
    assert [r["stage"] for r in double] == ["frozen", "unfrozen", "unfrozen"]
    sizes = [os.path.getsize(s) for s in shard_locations(sharded_colours, load_manifest(sharded_colours), "train")]
    assert len(sizes) >= 6
    for a, b in zip(single[1:], double[1:]):
        assert b["train_images"] == a["train_images"] == 48
        assert b["train_fingerprint"] == a["train_fingerprint"]
        # one process read the data once (its members; local shards seek over tar padding);
        # two read it once between them, about half each (a reader whose range starts
        # inside a shard seeks past the samples before it, reading only their headers)
        (alone,), (rank0, rank1) = a["train_read_bytes"], b["train_read_bytes"]
        assert 0 < alone <= sum(sizes)
        assert abs(rank0 + rank1 - alone) <= 512 * b["train_images"]
        assert max(rank0, rank1) <= alone / 2 + max(sizes)


def test_two_processes_reach_the_single_process_result(single_and_double):
    one, two = single_and_double
    single, double = rows(one)[-1], rows(two)[-1]
    # same global batch and seed; batches are composed differently across ranks
    assert abs(single["val_loss"] - double["val_loss"]) < 0.1
    assert abs(single["val_metric"] - double["val_metric"]) <= 0.25
    # only rank 0 wrote: one metrics line per epoch, one report
    assert len(rows(two)) == 3 and (two / "report.md").exists()


def test_a_dying_rank_fails_the_job_fast_and_resume_works(colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tagmill", "train", colour_dataset, "--out", str(run_dir), *ARGS[:-6], "--frozen-epochs", "1",
           "--epochs", "6", "--cache-views", "1", "--lr", "0.01", "--image-size", "64"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(rows(run_dir)) >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after a rank died")
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60
    stderr = proc.stderr.read()
    assert "SIGKILL" in stderr or "Signal 9" in stderr or "exitcode" in stderr
    resumed = tagmill("train", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(rows(run_dir)) == 7
