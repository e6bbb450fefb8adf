"""``POST /predict?explain=true``: heatmap overlays per returned class or tag, from the
model that answered, on both backends; bad requests refused precisely; explanations
limited apart from plain predictions, and counted in /metrics."""

from __future__ import annotations

import base64
import io
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tagmill.bundle import WEIGHTS_FILE, Predictor
from tagmill.bundle.explain import explain
from tagmill.serve import ServeConfig, create_app
from tagmill.serve.explanations import MAX_EXPLAINED, OVERLAY_MAX_SIDE
from tests import images
from tests.bundle import multilabel_onnx_bundle
from tests.serve.conftest import CLASSES, X_IMAGE, build_bundle, error_of, metric, serving

pytest.importorskip("pytorch_grad_cam")

JPEG = images.jpeg_bytes(96, 72, seed=31)
PNG = images.png_bytes(64, 64, seed=32)


def overlay(entry: dict) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(entry["overlay_png"], validate=True)))
    assert picture.format == "PNG" and picture.size == (entry["width"], entry["height"])
    return picture.convert("RGB")


def explained(client: TestClient, query: str, data: bytes = JPEG) -> httpx.Response:
    return client.post(f"/predict?{query}", content=data, headers=X_IMAGE)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("explain")
    return {"single": build_bundle(root, name="single"), "other": build_bundle(root, seed=1, name="other"),
            "multi": build_bundle(root, task="multi", name="multi")}


@pytest.fixture(scope="module")
def single(bundles: dict[str, str]) -> Iterator[TestClient]:
    with serving(create_app(ServeConfig(bundle=bundles["single"], explain_wait_s=0))) as client:
        yield client


def test_single_label_answer_gains_the_top_class_heatmap(single: TestClient, bundles: dict[str, str]) -> None:
    plain = single.post("/predict", content=JPEG, headers=X_IMAGE).json()
    answer = explained(single, "explain=true").json()
    assert "explanations" not in plain  # the answer without explain is unchanged
    assert {k: v for k, v in answer.items() if k != "explanations"} == plain
    (entry,) = answer["explanations"]
    assert entry["label"] == plain["labels"][0] and entry["score"] == pytest.approx(plain["scores"][entry["label"]])
    # the library's heatmap for the same image and class, byte for byte: the route adds nothing of its own
    found = explain(Predictor.from_bundle(bundles["single"]), JPEG, classes=[entry["label"]])
    assert base64.b64decode(entry["overlay_png"]) == found.heatmaps[0].overlay_png(found.image)
    drawn = np.asarray(overlay(entry), dtype=np.int16)
    assert np.abs(drawn - np.asarray(found.image, dtype=np.int16)).mean() > 10  # colour over the picture


def test_chosen_classes_in_the_order_asked_with_multipart(single: TestClient) -> None:
    files = {"file": ("poster.png", PNG, "image/png")}
    answer = single.post("/predict?explain_class=owl&explain_class=cat&explain_class=owl", files=files).json()
    assert [e["label"] for e in answer["explanations"]] == ["owl", "cat"]  # implies explain, once each
    first, second = (np.asarray(overlay(e), dtype=np.int16) for e in answer["explanations"])
    assert first.shape == second.shape == (64, 64, 3)


def test_multi_label_explains_each_tag_most_probable_first(bundles: dict[str, str]) -> None:
    with serving(create_app(ServeConfig(bundle=bundles["multi"]))) as client:
        answer = explained(client, "explain=true&threshold=0").json()
        ranked = sorted(CLASSES, key=lambda c: -answer["scores"][c])
        assert sorted(answer["labels"]) == sorted(CLASSES)
        assert [e["label"] for e in answer["explanations"]] == ranked
        # no tag over a threshold of 1: the most probable one still shows what the model looked at
        none = explained(client, "explain=true&threshold=1").json()
        assert none["labels"] == [] and [e["label"] for e in none["explanations"]] == [ranked[0]]


def test_large_pictures_get_a_bounded_overlay(single: TestClient) -> None:
    answer = explained(single, "explain=true", images.png_bytes(1600, 900, seed=33)).json()
    (entry,) = answer["explanations"]
    assert max(entry["width"], entry["height"]) <= OVERLAY_MAX_SIDE
    assert entry["width"] / entry["height"] == pytest.approx(1600 / 900, rel=0.02)
    overlay(entry)


def test_onnx_backend_explains_through_the_torch_weights(tmp_path: Path) -> None:
    with serving(create_app(ServeConfig(bundle=multilabel_onnx_bundle(), backend="onnx"))) as client:
        answer = explained(client, "explain=true").json()
        assert answer["labels"] and [e["label"] for e in answer["explanations"]] == \
            sorted(answer["labels"], key=lambda c: -answer["scores"][c])
        overlay(answer["explanations"][0])

    weightless = tmp_path / "weightless"
    shutil.copytree(multilabel_onnx_bundle(), weightless)
    (weightless / WEIGHTS_FILE).unlink()
    with serving(create_app(ServeConfig(bundle=str(weightless), backend="onnx"))) as client:
        refused = explained(client, "explain=true")
        assert refused.status_code == 409
        error = error_of(refused)
        assert error["type"] == "ExplanationUnsupportedError" and WEIGHTS_FILE in error["message"]
        assert explained(client, "").status_code == 200  # predictions still work


def test_bad_requests_are_refused_precisely(single: TestClient) -> None:
    unreadable = explained(single, "explain=true", b"not an image at all")
    assert unreadable.status_code == 422 and error_of(unreadable)["type"] == "UnreadableImageError"
    unknown = explained(single, "explain_class=zebra")
    assert unknown.status_code == 400
    assert "zebra" in error_of(unknown)["message"] and "cat, dog, owl" in error_of(unknown)["hint"]
    too_many = explained(single, "&".join(f"explain_class={c}" for c in CLASSES * 3))
    assert too_many.status_code == 400 and str(MAX_EXPLAINED) in error_of(too_many)["message"]
    assert explained(single, "explain=perhaps").status_code == 400


def test_explanations_beyond_the_limit_get_503_while_predictions_answer(single: TestClient) -> None:
    service = single.app.state.service
    before = single.get("/metrics").text
    with service.explainer.hold():  # the worker's one explanation slot is busy
        busy = explained(single, "explain=true")
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert error_of(busy)["type"] == "ExplainBusyError"
        assert single.post("/predict", content=JPEG, headers=X_IMAGE).status_code == 200
        assert single.post("/invocations", content=JPEG, headers=X_IMAGE).status_code == 200
    assert explained(single, "explain=true").status_code == 200  # the slot is free again
    explained(single, "explain_class=zebra")  # refused before it takes a slot: not an explanation
    explained(single, "explain=true", b"not an image")
    after = single.get("/metrics").text
    counted = {outcome: metric(after, "tagmill_explanations_total", outcome=outcome)
               - metric(before, "tagmill_explanations_total", outcome=outcome) for outcome in ("ok", "refused", "failed")}
    assert counted == {"ok": 1, "refused": 1, "failed": 1}
    assert metric(after, "tagmill_explanation_duration_seconds_count") - \
        metric(before, "tagmill_explanation_duration_seconds_count") == 1


def test_a_waiting_explanation_gets_the_slot_when_it_frees(bundles: dict[str, str]) -> None:
    with serving(create_app(ServeConfig(bundle=bundles["single"], explain_wait_s=30))) as client:
        answers: list[httpx.Response] = []
        with client.app.state.service.explainer.hold():
            waiting = threading.Thread(target=lambda: answers.append(explained(client, "explain=true")))
            waiting.start()
            assert client.post("/predict", content=JPEG, headers=X_IMAGE).status_code == 200
        waiting.join(60)
        assert [a.status_code for a in answers] == [200]


def test_a_swapped_model_explains_with_its_version(bundles: dict[str, str]) -> None:
    with serving(create_app(ServeConfig(bundle=bundles["single"]))) as client:
        first = explained(client, "explain_class=cat").json()
        outcome = client.app.state.service.swap_to(bundles["other"])
        second = explained(client, "explain_class=cat").json()
        assert second["model_version"] == outcome.version != first["model_version"]
        found = explain(Predictor.from_bundle(bundles["other"]), JPEG, classes=["cat"])
        assert base64.b64decode(second["explanations"][0]["overlay_png"]) == found.heatmaps[0].overlay_png(found.image)
        assert second["explanations"][0]["score"] == pytest.approx(second["scores"]["cat"])
