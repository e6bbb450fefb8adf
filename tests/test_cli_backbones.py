"""Any timm backbone end to end: weights from a hub cache → train → export → predict → serve.

The hub cache is built by the test (``tests/hub_cache.py``) and read offline
(``HF_HUB_OFFLINE=1``, conftest); its config.json carries a mean/std no timm default
has, so the bundle can be seen to carry the weights' own preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from tagmill.bundle import Predictor, load_bundle, save_bundle
from tagmill.bundle.format import BundleMeta
from tagmill.cli import app
from tagmill.dataset.transforms import Preprocess
from tagmill.errors import InputError, WeightsNotFoundError
from tagmill.models import create_classifier
from tagmill.serve.app import create_app
from tagmill.serve.config import ServeConfig
from tests import images
from tests.hub_cache import add_timm_repo
from tests.serve.conftest import ServerProcess, serving

runner = CliRunner()
ODD_MEAN, ODD_STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
FAST = ["--image-size", "64", "--batch-size", "8", "--workers", "0", "--frozen-epochs", "1", "--epochs", "2",
        "--lr", "0.02"]


def run(*args: str, code: int = 0):
    result = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "300"})
    assert result.exit_code == code, result.output
    return result


def images_in(dataset: str) -> int:
    from tagmill.dataset.manifest import load_manifest

    manifest = load_manifest(dataset)
    return sum(manifest.split(name).count for name in ("train", "val"))


def probabilities(path: Path) -> list[list[float]]:
    return [json.loads(line)["probabilities"] for line in path.read_text().splitlines()]


def test_a_resnet_from_the_hub_cache_trains_exports_predicts_and_serves(
    colour_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    add_timm_repo(cache, "test_resnet.r160_in1k", pretrained_cfg={"mean": ODD_MEAN, "std": ODD_STD})

    run("train", colour_dataset, "--out", str(tmp_path / "run"), "--backbone", "test_resnet", *FAST)
    run("export", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"), "--onnx")
    _, meta = load_bundle(str(tmp_path / "bundle"))
    pre = meta.preprocess
    assert (pre.mean, pre.std, pre.interpolation, pre.crop_pct) == (ODD_MEAN, ODD_STD, "bilinear", 0.95)
    assert meta.architecture == "test_resnet"

    folder = tmp_path / "images"
    for seed in range(4):
        images.write(folder / f"{seed}.jpg", images.jpeg_bytes(80, 60, seed=seed))
    torch_out = run("predict", str(tmp_path / "bundle"), str(folder), "--device", "cpu",
                    "--jsonl", str(tmp_path / "torch.jsonl"))
    assert "running on torch on cpu" in torch_out.output
    onnx_out = run("predict", str(tmp_path / "bundle"), str(folder), "--backend", "onnx",
                   "--jsonl", str(tmp_path / "onnx.jsonl"))
    assert "running on onnxruntime CPUExecutionProvider" in onnx_out.output  # auto, no GPU here
    expected = probabilities(tmp_path / "torch.jsonl")
    assert torch.allclose(torch.tensor(probabilities(tmp_path / "onnx.jsonl")), torch.tensor(expected), atol=1e-4)

    with ServerProcess(str(tmp_path / "bundle"), "--backend", "onnx") as server, httpx.Client(base_url=server.url) as client:
        answer = client.post("/invocations", content=(folder / "0.jpg").read_bytes(),
                             headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200, answer.text
        served = answer.json()  # SageMaker's answer: the probabilities, in class order
        info = client.get("/api/model").json()
    assert torch.allclose(torch.tensor(served), torch.tensor(expected[0]), atol=1e-4)
    assert info["backend"] == "onnx" and info["runs_on"] == "onnxruntime CPUExecutionProvider"

    # the doctor takes features of any width: the run's (multi-level pooled) and the hub backbone's own
    for source in (["--model", str(tmp_path / "run")], ["--backbone", "test_resnet", "--image-size", "64"]):
        out = tmp_path / f"doctor{len(source)}"
        run("doctor", colour_dataset, "--out", str(out), "--workers", "0", *source)
        assert json.loads((out / "doctor.json").read_text())["counts"]["images"] == images_in(colour_dataset)


def test_a_vit_bundle_agrees_between_torch_and_onnx_in_the_server(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_classifier("test_vit", 3, pretrained=False).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.get_classifier().weight, std=5.0)  # the head starts at zero: spread it
    meta = BundleMeta(architecture="test_vit", task="single", classes=("a", "b", "c"),
                      preprocess=Preprocess(input_size=160, mean=ODD_MEAN, std=ODD_STD))
    bundle = save_bundle(str(tmp_path / "vit"), model, meta, onnx=True)
    data = images.jpeg_bytes(120, 90, seed=3)
    reference = Predictor.from_bundle(bundle, device="cpu").predict_bytes([data])[0].probabilities

    with serving(create_app(ServeConfig(bundle=bundle, backend="onnx", device="cpu"))) as client:
        answer = client.post("/invocations", content=data, headers={"Content-Type": "image/jpeg"})
        assert answer.status_code == 200, answer.text
        assert client.get("/api/model").json()["runs_on"] == "onnxruntime CPUExecutionProvider"
    assert torch.allclose(torch.tensor(answer.json()), torch.tensor(reference), atol=1e-4)
    assert max(reference) > 0.5


def test_weights_that_cannot_be_found_or_fitted_leave_no_run_behind(
    colour_dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    missing = run("train", colour_dataset, "--out", str(tmp_path / "r1"), "--backbone", "test_vit", *FAST,
                  code=WeightsNotFoundError.exit_code)
    assert "timm/test_vit.r160_in1k" in missing.output and "hf download" in missing.output
    assert not (tmp_path / "r1").exists()

    other = create_classifier("test_efficientnet", 3, pretrained=False)
    from safetensors.torch import save_file

    save_file(other.state_dict(), str(tmp_path / "efficientnet.safetensors"))
    misfit = run("train", colour_dataset, "--out", str(tmp_path / "r2"), "--backbone", "test_resnet",
                 "--weights", str(tmp_path / "efficientnet.safetensors"), *FAST, code=InputError.exit_code)
    assert "efficientnet.safetensors does not fit test_resnet" in misfit.output
    assert not (tmp_path / "r2").exists()

    add_timm_repo(cache, "test_resnet.r160_in1k")
    cached = next(cache.glob("models--timm--test_resnet.r160_in1k/snapshots/*/model.safetensors"))
    cached.write_bytes(b"\x00" * 64)  # a download cut short
    corrupt = run("train", colour_dataset, "--out", str(tmp_path / "r4"), "--backbone", "test_resnet", *FAST,
                  code=InputError.exit_code)
    assert f"cannot read weights from {cached}" in corrupt.output and not (tmp_path / "r4").exists()

    assert "unknown architecture 'resnet43'" in run("train", colour_dataset, "--out", str(tmp_path / "r5"),
                                                    "--backbone", "resnet43", code=InputError.exit_code).output
    assert not (tmp_path / "r5").exists()
    assert "no pretrained tag 'nope'" in run("train", colour_dataset, "--out", str(tmp_path / "r3"), "--backbone",
                                             "resnet18.nope", *FAST, code=InputError.exit_code).output
    assert not (tmp_path / "r3").exists()


def test_a_gpu_asked_for_where_there_is_none_is_refused_before_work(tmp_path: Path) -> None:
    from tagmill.bundle.onnx_export import onnx_providers

    model = create_classifier("test_resnet", 2, pretrained=False)
    meta = BundleMeta(architecture="test_resnet", task="single", classes=("a", "b"), preprocess=Preprocess(input_size=64))
    bundle = save_bundle(str(tmp_path / "b"), model, meta, onnx=True)
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: refused with or without GPUs
    assert "no CUDA GPU" in run("predict", bundle, str(tmp_path), "--device", absent, code=InputError.exit_code).output
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # the CPU build
        with pytest.raises(InputError, match="no CUDA provider"):
            onnx_providers(torch.device("cuda"), required=True)
        assert onnx_providers(torch.device("cuda"), required=False) == ["CPUExecutionProvider"]  # auto falls back


def test_backbones_lists_costs_and_which_weights_are_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    add_timm_repo(cache, "test_resnet.r160_in1k")
    add_timm_repo(cache, "test_vit.r160_in1k", repo="someone/stills-vit")

    listing = run("backbones", "--json", str(tmp_path / "all.json")).output
    rows = {row["name"]: row for row in json.loads((tmp_path / "all.json").read_text())}
    assert rows["efficientnet_lite0"]["weights"] == "package" and rows["resnet50"]["weights"] is None
    assert rows["test_resnet.r160_in1k"]["weights"] == "hub cache"  # found in the cache, listed by its timm name
    assert rows["hf-hub:someone/stills-vit"]["weights"] == "hub cache"
    assert rows["resnet50"]["params_m"] == pytest.approx(25.6, abs=0.1)  # timm's ResNet-50: 25.6 M
    assert rows["resnet50"]["gflops"] == pytest.approx(8.18, abs=0.05)  # 4.09 G multiply-adds at 224 px
    assert "resnet152" in listing and "hub cache" in listing

    run("backbones", "test_resnet", "test_efficientnet", "--filter", "test_vit.*", "--measure",
        "--json", str(tmp_path / "measured.json"))
    measured = {row["name"]: row for row in json.loads((tmp_path / "measured.json").read_text())}
    assert set(measured) == {"test_resnet", "test_efficientnet", "test_vit.r160_in1k"}
    assert measured["test_resnet"]["weights"] == "hub cache" and measured["test_efficientnet"]["weights"] is None
    assert all(row["infer_per_s"] > 0 and row["train_per_s"] > 0 for row in measured.values())
    assert measured["test_vit.r160_in1k"]["input_size"] == 160

    assert "no pretrained timm model matches" in run("backbones", "--filter", "nothing_like_this*",
                                                     code=InputError.exit_code).output
