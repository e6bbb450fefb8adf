"""A SageMaker training job's ``/opt/ml`` as the Caltech-256 .lst job lays it out: image
channels ``train`` and ``validation`` (a folder per class) beside ``train_lst`` and
``validation_lst`` (one .lst file each), and the built-in algorithm's hyperparameters.

Used on the host (tests/test_sagemaker_container.py) and inside the container
(tests/container/), so both check the same job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import make_colour_classes

CLASSES = ("red", "green", "blue")
PER_CLASS = 16
#: every fourth image is a validation image
VALIDATION_EVERY = 4
#: SageMaker's image-classification names, as strings (SageMaker passes every value as one)
HYPERPARAMETERS = {
    "num_classes": str(len(CLASSES)),
    "num_training_samples": str(len(CLASSES) * (PER_CLASS - PER_CLASS // VALIDATION_EVERY)),
    "use_pretrained_model": "1",
    "epochs": "2",
    "image_shape": "3,64,64",
    "mini_batch_size": "8",
    "learning_rate": "0.01",
}


def make_job(root: Path, *, hyperparameters: dict[str, str] | None = None, validation: bool = True) -> Path:
    """``root`` laid out as ``/opt/ml`` for a .lst training job; returns ``root``."""
    data = root / "input" / "data"
    pictures = make_colour_classes(root / "pictures", PER_CLASS, CLASSES)
    lists: dict[str, list[str]] = {"train": [], "validation": []}
    for label, name in enumerate(CLASSES):
        for i, picture in enumerate(sorted((pictures / name).iterdir())):
            channel = "validation" if i % VALIDATION_EVERY == 0 else "train"
            if channel == "validation" and not validation:
                continue
            target = data / channel / name / picture.name
            target.parent.mkdir(parents=True, exist_ok=True)
            picture.replace(target)
            # im2rec's .lst: index TAB label (a float) TAB path relative to the channel
            lists[channel].append(f"{len(lists[channel])}\t{float(label):.6f}\t{name}/{picture.name}\n")
    shutil.rmtree(pictures)
    for channel, lines in lists.items():
        if lines:
            (data / f"{channel}_lst").mkdir(parents=True)
            (data / f"{channel}_lst" / f"colours-{channel}.lst").write_text("".join(lines))
    config = root / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(HYPERPARAMETERS if hyperparameters is None else hyperparameters))
    return root


def failure(root: Path) -> str:
    """What the job wrote to output/failure ("" when there is none)."""
    path = root / "output" / "failure"
    return path.read_text() if path.is_file() else ""
