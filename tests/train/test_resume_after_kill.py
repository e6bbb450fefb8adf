"""A training run killed with SIGKILL mid-epoch resumes and ends where an
uninterrupted run ends (same machine, same seed)."""

import json
import os
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from tagmill.cli import app

ARGS = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "96", "--batch-size", "8",
        "--workers", "0", "--frozen-epochs", "1", "--epochs", "4", "--cache-views", "1", "--lr", "0.01"]
TIMING = {"images_per_s", "seconds"}


def rows(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def test_sigkill_then_resume_matches_uninterrupted(colour_dataset, tmp_path):
    runner = CliRunner()
    full = runner.invoke(app, ["train", colour_dataset, "--out", str(tmp_path / "full"), *ARGS], catch_exceptions=False)
    assert full.exit_code == 0, full.output

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tagmill", "train", colour_dataset, "--out", str(killed), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(rows(killed))
    assert 2 <= done_before < 5

    resumed = runner.invoke(app, ["train", "--resume", str(killed)], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert rows(killed) == rows(tmp_path / "full")
