"""The CUDA path, where a GPU is present: training in fp32 and bf16 autocast, the bundle
it exports answering the same on the GPU as on the CPU, and torchrun refusing more
processes than GPUs before any process group exists.

These run only on a machine with an NVIDIA GPU (`bench/gpu_check.sh` runs them there
with the rest of the training tests); without one, the refusals are tested in
test_loop.py, test_cli_backbones.py and test_cli_train_to_predict.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tagmill.bundle import Predictor
from tagmill.bundle.from_run import export_run
from tagmill.train.config import TrainConfig
from tagmill.train.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (bench/gpu_check.sh)")

TINY = dict(backbone="test_efficientnet", pretrained=False, image_size=48, batch_size=8, workers=1, lr=1e-2,
            frozen_epochs=1, unfrozen_epochs=2, cache_views=1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_the_gpu(colour_dataset, tmp_path, precision):
    run_dir = tmp_path / "run"
    result = train(colour_dataset, str(run_dir), TrainConfig(**TINY, device="cuda", precision=precision))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["frozen", "unfrozen", "unfrozen"]
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in rows)
    assert result.best_metric >= 0.75  # the colours are easy; chance is 1/3
    # the checkpoint holds CPU-loadable tensors: a bundle made from it predicts on a CPU
    export_run(str(run_dir), str(tmp_path / "bundle"))
    on_cpu = Predictor.from_bundle(str(tmp_path / "bundle"), device="cpu")
    assert on_cpu.predict(_coloured_png((200, 30, 30))).labels == ["red"]


def test_a_bundle_answers_the_same_on_the_gpu_as_on_the_cpu(colour_dataset, tmp_path):
    run_dir = tmp_path / "run"
    train(colour_dataset, str(run_dir), TrainConfig(**TINY, device="cuda"))
    export_run(str(run_dir), str(tmp_path / "bundle"))
    pictures = [_coloured_png(rgb) for rgb in [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120)]]
    cpu = Predictor.from_bundle(str(tmp_path / "bundle"), device="cpu")
    gpu = Predictor.from_bundle(str(tmp_path / "bundle"), device="cuda")
    assert "cuda" in gpu.runs_on
    for a, b in zip(cpu.predict_bytes(pictures), gpu.predict_bytes(pictures)):
        assert a.ok and b.ok and a.labels == b.labels
        # cuDNN's convolutions (TF32 where allowed) round differently from the CPU's fp32
        assert max(abs(p - q) for p, q in zip(a.probabilities, b.probabilities)) < 5e-3


def _coloured_png(rgb: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_more_processes_than_gpus_is_refused_before_any_work(colour_dataset, tmp_path):
    processes = torch.cuda.device_count() + 1
    done = subprocess.run(
        [sys.executable, "-m", "tagmill", "train", colour_dataset, "--out", str(tmp_path / "run"), "--nproc",
         str(processes), "--device", "cuda", "--backbone", "test_efficientnet", "--no-pretrained", "--image-size",
         "48", "--epochs", "1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "nccl needs one GPU per process" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
