"""report.md, top losses and thumbnails."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from tagmill.errors import InputError, UnreadableImageError
from tagmill.evaluate import multi_label_metrics, single_label_metrics, top_losses, write_report, write_thumbnail
from tests import images


def multi_result(num_tags: int = 40):
    generator = torch.Generator().manual_seed(3)
    targets = (torch.rand(60, num_tags, generator=generator) < 0.3).long()  # (N, C)
    targets[:, 0] = 0  # a tag never present: excluded from mAP and ROC-AUC
    probs = (0.6 * targets + 0.5 * torch.rand(60, num_tags, generator=generator)).clamp(0, 1)  # (N, C)
    classes = [f"tag{i}" for i in range(num_tags)]
    classes[1] = "pipe|tag"
    return multi_label_metrics(probs, targets, classes, threshold=0.2)


def test_report_for_a_multi_label_run(tmp_path):
    run = tmp_path / "run"
    write_thumbnail(images.jpeg_bytes(300, 200), str(run / "top_losses" / "000.jpg"))
    result = multi_result()
    location = write_report(
        str(run),
        title="Movie stills, 183 tags",
        result=result,
        plots={"curves": str(run / "curves.png"), "per_class_f1": "per_class_f1.png"},
        top_losses=[{"thumbnail": "top_losses/000.jpg", "id": "tt0111161", "true": ["bed", "text"],
                     "predicted": [], "loss": 2.5}],
        config={"model": "efficientnet_lite0", "epochs": {"frozen": 4, "unfrozen": 3}, "lr": 0.01},
    )
    assert location == str(run / "report.md")
    text = (run / "report.md").read_text()
    assert text.startswith("# Movie stills, 183 tags\n")
    assert "![Training curves](curves.png)" in text  # absolute path inside the run dir made relative
    assert "![F1 per class](per_class_f1.png)" in text
    # fastai's metrics keep their names and say whose definitions they are
    assert f"| accuracy_thresh (fastai's: share of all image×tag decisions right) | {result.headline['accuracy_thresh']:.4f} |" in text
    assert "| fbeta (fastai's: F-beta per image, averaged; an untagged image scores 0) |" in text
    assert "| roc_auc |" in text and "| mAP |" in text
    assert "leaves out 1 (no positive sample in this data): tag0" in text
    # 40 tags: only the 30 worst are listed
    per_class = text.split("## Per-class metrics")[1].split("##")[0]
    assert "The 30 classes with the lowest F1, of 40" in per_class
    assert len(re.findall(r"^\| (tag\d+|pipe\\\|tag) \|", per_class, flags=re.M)) == 30
    assert "| tag0 | 0.0000 | 0.0000 | 0.0000 | 0 | – | – |" in per_class
    assert "![tt0111161](top_losses/000.jpg) | tt0111161 | bed, text | (none) | 2.5000 |" in text
    assert '"model": "efficientnet_lite0"' in text


def test_report_for_a_single_label_run(tmp_path):
    targets = torch.tensor([0, 1, 2, 1])
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.1, 0.8, 0.1]])
    result = single_label_metrics(probs, targets, ["cat", "dog", "owl"])
    write_report(str(tmp_path), title="Pets", result=result, plots={"confusion": "confusion.png"}, top_losses=[],
                 config={})
    text = (tmp_path / "report.md").read_text()
    assert "Single-label classification: 4 evaluated samples, 3 classes." in text
    assert "| accuracy | 0.7500 |" in text
    assert "| owl | 0.0000 | 0.0000 | 0.0000 | 1 |" in text
    assert "Worst-predicted" not in text  # nothing to show, no empty section


def test_top_losses():
    losses = torch.tensor([0.1, 3.0, 0.5, 2.0, 0.2])
    assert top_losses(losses, 3) == [1, 3, 2]
    assert top_losses(losses, 10) == [1, 3, 2, 4, 0]
    assert top_losses(losses, 0) == []
    with pytest.raises(InputError):
        top_losses(losses.reshape(5, 1), 2)
    with pytest.raises(InputError):
        top_losses(losses, -1)


def test_thumbnail_fits_the_size_and_keeps_the_aspect(tmp_path):
    out = tmp_path / "thumbs" / "001.jpg"
    write_thumbnail(images.jpeg_bytes(400, 200), str(out), size=128)
    with Image.open(out) as image:
        assert image.format == "JPEG"
        assert image.size == (128, 64)


def test_thumbnail_of_bad_bytes_is_an_unreadable_image(tmp_path):
    with pytest.raises(UnreadableImageError):
        write_thumbnail(b"not an image", str(tmp_path / "x.jpg"))
    assert not (tmp_path / "x.jpg").exists()
