"""The web page in a real browser: Debian's chromium, driven headless by playwright.

A small FastAPI stub serves the page's static files and answers the page's API
(``/api/model``, ``/predict``, ``/examples/...``) with fixed payloads of the contract,
so the page is checked on its own: a binary single-label model, a multi-label model,
error answers, a phone-width screen. The last test runs the same page against the
real ``tagmill.serve.app`` with a tiny bundle. Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw
from playwright.sync_api import Browser, Page, expect, sync_playwright

import tagmill
from tests import images

STATIC = Path(tagmill.__file__).parent / "serve" / "static"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 740}

# ---------------------------------------------------------------- the stub's payloads

BINARY_MODEL = {
    "name": "thriller-or-not",
    "architecture": "efficientnet_lite0",
    "task": "single",
    "classes": ["other", "thriller"],
    "thresholds": None,
    "default_top_k": 2,
    "metrics": {"accuracy": 0.912, "f1": 0.874, "roc_auc": 0.951, "loss": 0.243, "ece": None, "split": "val"},
    "input_size": 224,
    "examples": ["/examples/x.png"],
}
BINARY_SCORES = {"other": 0.37, "thriller": 0.63}

MULTI_CLASSES = ["outdoor", "people", "animal", "night", "food", "text", "vehicle", "water"]
MULTI_MODEL = {
    "name": "photo-tags",
    "architecture": "convnext_tiny",
    "task": "multi",
    "classes": MULTI_CLASSES,
    "thresholds": [0.5, 0.4, 0.5, 0.6, 0.5, 0.5, 0.45, 0.5],
    "default_top_k": 5,
    "metrics": {"macro_f1": 0.781, "micro_f1": 0.835, "map": 0.842, "split": "val"},
    "input_size": 256,
    "examples": ["/examples/x.png"],
}
MULTI_SCORES = {
    "outdoor": 0.94, "people": 0.41, "animal": 0.72, "night": 0.55,
    "food": 0.03, "text": 0.31, "vehicle": 0.12, "water": 0.47,
}
MULTI_OVER = ["outdoor", "animal", "people"]  # over their own thresholds; night (0.55 < 0.6) is not

ANIMALS = ["cat", "dog", "owl", "fox", "rabbit", "deer"]
ANIMAL_MODEL = {
    "name": "garden-animals",
    "architecture": "resnet50",
    "task": "single",
    "classes": ANIMALS,
    "thresholds": None,
    "default_top_k": 3,
    "metrics": {"accuracy": 0.88, "top3_accuracy": 0.97, "macro_f1": None, "split": "val"},
    "input_size": 224,
    "examples": [],
}
ANIMAL_SCORES = {"cat": 0.05, "dog": 0.08, "owl": 0.02, "fox": 0.71, "rabbit": 0.1, "deer": 0.04}


@dataclass
class Stub:
    """What a stub server got asked: the page's requests, for the tests to check."""

    model: dict[str, Any]
    scores: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    explain_busy: bool = False  #: answer explanations 503, as a server whose slots are all busy


def _error(status: int, type_: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status)


def stub_app(stub: Stub) -> FastAPI:
    app = FastAPI()
    model = stub.model

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/model")
    def api_model() -> dict[str, Any]:
        return model

    @app.get("/examples/{name}")
    def example(name: str) -> Response:
        if name != "x.png":
            return _error(404, "not_found", f"no example named {name!r}")
        return Response(images.png_bytes(96, 64, seed=3), media_type="image/png")

    @app.post("/predict")
    async def predict(request: Request, top_k: int | None = None, threshold: float | None = None,
                      explain: bool = False) -> JSONResponse:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return _error(400, "bad_request", "send the image as the multipart field 'file'")
        data = await upload.read()
        stub.predictions.append({"filename": upload.filename, "size": len(data),
                                 "top_k": top_k, "threshold": threshold, "explain": explain})
        if explain and stub.explain_busy:
            return JSONResponse({"error": {"type": "ExplainBusyError", "message": "every explanation slot is busy"}},
                                status_code=503, headers={"Retry-After": "0"})
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception:
            return _error(422, "unreadable_image",
                          f"{upload.filename} is not an image we can read (JPEG, PNG, WebP, GIF, BMP, TIFF)")
        scores = stub.scores
        ranked = sorted(scores, key=scores.get, reverse=True)
        if model["task"] == "multi":
            thresholds = [threshold] * len(model["classes"]) if threshold is not None else model["thresholds"]
            labels = [c for c in ranked if scores[c] >= thresholds[model["classes"].index(c)]]
        else:
            labels = ranked[:1]
        k = top_k or model["default_top_k"]
        top = [{"label": c, "score": scores[c]} for c in ranked[:k]]
        answer = {"labels": labels, "scores": scores, "top": top, "task": model["task"]}
        if explain:
            answer["explanations"] = [{"label": c, "score": scores[c], **stub_overlay(data, i)}
                                      for i, c in enumerate(labels or ranked[:1])]
        return JSONResponse(answer)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def stub_overlay(data: bytes, position: int) -> dict[str, Any]:
    """A stand-in heatmap overlay: the picture with a red patch, placed by the class's position."""
    with Image.open(io.BytesIO(data)) as img:
        picture = img.convert("RGB")
    w, h = picture.size
    left = (position % 3) * w // 3
    ImageDraw.Draw(picture).rectangle((left, h // 4, left + w // 3, 3 * h // 4), fill=(230, 30, 20))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return {"overlay_png": base64.b64encode(buffer.getvalue()).decode(), "width": w, "height": h}


# ---------------------------------------------------------------- servers and browser


class Server:
    """uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def binary_stub() -> Iterator[tuple[Stub, str]]:
    stub = Stub(BINARY_MODEL, BINARY_SCORES)
    with Server(stub_app(stub)) as server:
        yield stub, server.url


@pytest.fixture(scope="module")
def multi_stub() -> Iterator[tuple[Stub, str]]:
    stub = Stub(MULTI_MODEL, MULTI_SCORES)
    with Server(stub_app(stub)) as server:
        yield stub, server.url


@pytest.fixture(scope="module")
def animal_stub() -> Iterator[tuple[Stub, str]]:
    stub = Stub(ANIMAL_MODEL, ANIMAL_SCORES)
    with Server(stub_app(stub)) as server:
        yield stub, server.url


def open_page(browser: Browser, url: str, viewport: dict[str, int] = DESKTOP) -> Page:
    context = browser.new_context(viewport=viewport, reduced_motion="reduce", device_scale_factor=1)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # chromium logs every 4xx/5xx answer as "Failed to load resource": expected here
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and not msg.text.startswith("Failed to load resource") else None)
    page.problems = problems  # type: ignore[attr-defined]
    page.goto(url + "/")
    return page


def upload(page: Page, name: str, data: bytes, mime: str) -> None:
    page.set_input_files("#file-input", {"name": name, "mimeType": mime, "buffer": data})


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def no_horizontal_scroll(page: Page, width: int) -> None:
    scroll_width = page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= width, f"the page is {scroll_width}px wide on a {width}px screen"


# ---------------------------------------------------------------- tests


def test_binary_model_answers_the_question(browser: Browser, binary_stub: tuple[Stub, str]) -> None:
    stub, url = binary_stub
    page = open_page(browser, url)
    card = page.locator("#model-card")
    expect(card).to_contain_text("thriller-or-not")
    expect(card).to_contain_text("efficientnet_lite0")
    expect(card.locator(".chip")).to_have_text(["other", "thriller"])
    expect(page.locator("#class-count")).to_have_text("2")
    expect(card.locator(".metrics")).to_contain_text("91.2%")  # accuracy
    expect(card.locator(".metrics")).to_contain_text("0.243")  # loss stays a number
    expect(page).to_have_title("thriller-or-not · tagmill")

    stub.predictions.clear()
    upload(page, "poster.png", images.png_bytes(120, 80, seed=1), "image/png")
    result = page.locator("#result")
    expect(result.locator(".question")).to_have_text("Is it thriller?")
    expect(result.locator(".big-pct")).to_have_text("63%")
    expect(result.locator(".pill")).to_have_text("Yes")
    expect(result.locator(".row[data-label='other'] .row-pct")).to_have_text("37%")
    expect(page.locator("#preview-img")).to_have_attribute("alt", "Preview of poster.png")
    expect(page.locator("#preview-caption")).to_contain_text("120×80")
    assert stub.predictions[-1]["filename"] == "poster.png"
    assert stub.predictions[-1]["size"] == len(images.png_bytes(120, 80, seed=1))
    assert page.problems == []  # type: ignore[attr-defined]
    screenshot(page, "web_page_desktop_binary.png")
    page.context.close()


def test_multi_label_highlights_tags_over_their_threshold(browser: Browser, multi_stub: tuple[Stub, str]) -> None:
    stub, url = multi_stub
    page = open_page(browser, url)
    expect(page.locator("#model-card .chip")).to_have_text(MULTI_CLASSES)
    expect(page.locator("#model-card .metrics")).to_contain_text("84.2%")

    upload(page, "street.png", images.png_bytes(64, 64, seed=2), "image/png")
    over = page.locator("#result .row[data-over='true']")
    expect(over).to_have_count(len(MULTI_OVER))
    expect(over.locator(".row-name")).to_have_text(MULTI_OVER)
    expect(over.locator(".row-pct")).to_contain_text(["94%", "72%", "41%"])
    # highlighted: drawn differently from the tags under their threshold
    over_bg = over.first.evaluate("el => getComputedStyle(el).backgroundColor")
    below = page.locator("#result .row[data-over='false']")
    expect(below.locator(".row-name")).to_have_text(["night", "water", "text"])  # the next three
    below_bg = below.first.evaluate("el => getComputedStyle(el).backgroundColor")
    assert over_bg != below_bg
    expect(page.locator("#result .question")).to_have_text("3 tags found")
    assert stub.predictions[-1]["threshold"] is None

    # one threshold for every tag: the page asks again and shows the server's new answer
    page.locator("#settings summary").click()
    page.locator("#threshold-custom").check()
    page.locator("#threshold-input").fill("0.3")
    expect(over.locator(".row-name")).to_have_text(["outdoor", "animal", "night", "water", "people", "text"])
    assert stub.predictions[-1]["threshold"] == pytest.approx(0.3)
    assert page.problems == []  # type: ignore[attr-defined]
    page.context.close()


def test_single_label_shows_the_top_k(browser: Browser, animal_stub: tuple[Stub, str]) -> None:
    stub, url = animal_stub
    page = open_page(browser, url)
    expect(page.locator("#model-card .chip")).to_have_text(ANIMALS)
    expect(page.locator("#model-card .metrics")).to_contain_text("Top-3 accuracy")
    expect(page.locator("#examples")).to_be_hidden()  # this model has none
    upload(page, "garden.png", images.png_bytes(seed=7), "image/png")
    rows = page.locator("#result .row")
    expect(rows.locator(".row-name")).to_have_text(["fox", "rabbit", "dog"])
    expect(rows.locator(".row-pct")).to_have_text(["71%", "10%", "8.0%"])
    expect(page.locator("#result .question")).to_have_text("It looks like fox")
    expect(page.locator("#result .row.is-top .row-name")).to_have_text("fox")
    assert stub.predictions[-1]["top_k"] == 3

    page.locator("#settings summary").click()
    page.fill("#topk-input", "5")
    page.press("#topk-input", "Enter")
    expect(rows).to_have_count(5)
    assert stub.predictions[-1]["top_k"] == 5
    screenshot(page, "web_page_desktop_top_k.png")
    page.context.close()


def test_errors_from_the_server_are_shown(browser: Browser, binary_stub: tuple[Stub, str]) -> None:
    _, url = binary_stub
    page = open_page(browser, url)
    expect(page.locator("#model-card .chip")).to_have_count(2)
    upload(page, "notes.txt", b"shot on a phone, not an image", "text/plain")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text("That image couldn't be read")
    expect(error).to_contain_text("notes.txt is not an image we can read")
    expect(error).to_contain_text("HTTP 422")
    expect(page.locator("#result .question")).to_have_count(0)
    screenshot(page, "web_page_desktop_error.png")

    # a good image afterwards clears the error
    upload(page, "ok.png", images.png_bytes(), "image/png")
    expect(page.locator("#result .question")).to_have_text("Is it thriller?")
    expect(error).to_be_hidden()

    # addresses elsewhere are refused without fetching them
    page.fill("#url-input", "https://example.com/cat.jpg")
    page.click("#url-form button[type=submit]")
    expect(error).to_contain_text("Only this server's images")
    expect(error).to_contain_text("https://example.com")
    page.context.close()


def test_examples_addresses_and_keyboard(browser: Browser, binary_stub: tuple[Stub, str]) -> None:
    stub, url = binary_stub
    page = open_page(browser, url)
    # Subscribe to file choosers now: playwright subscribes in the background when the
    # first listener comes, which can lose the race with a key press right after it.
    page.on("filechooser", lambda chooser: None)
    example = page.get_by_role("button", name="Classify the example x.png")
    expect(example).to_be_visible()
    stub.predictions.clear()
    example.click()
    expect(page.locator("#result .question")).to_have_text("Is it thriller?")
    assert stub.predictions[-1]["filename"] == "x.png"
    assert stub.predictions[-1]["size"] == len(images.png_bytes(96, 64, seed=3))

    # a pasted address of this server, absolute or relative
    page.fill("#url-input", f"{url}/examples/x.png")
    page.press("#url-input", "Enter")
    expect(page.locator("#status")).to_contain_text("Answered in")
    assert len(stub.predictions) == 2
    page.fill("#url-input", "/examples/missing.png")
    page.press("#url-input", "Enter")
    expect(page.locator("#error")).to_contain_text("no example named 'missing.png'")

    # the drop zone is reachable by keyboard and opens the file picker on Enter and Space
    zone = page.locator("#dropzone")
    zone.focus()
    outline = zone.evaluate("el => getComputedStyle(el).boxShadow")
    assert outline != "none"  # a visible focus ring
    for key in ("Enter", " "):
        with page.expect_file_chooser() as chooser:
            page.keyboard.press(key)
        chooser.value.set_files({"name": f"k{key.strip() or 'space'}.png", "mimeType": "image/png",
                                 "buffer": images.png_bytes(seed=5)})
        expect(page.locator("#preview-img")).to_have_attribute("alt", f"Preview of k{key.strip() or 'space'}.png")
    page.context.close()


@pytest.mark.parametrize("which", ["binary", "multi"])
def test_phone_width_has_no_horizontal_scroll(
    browser: Browser, binary_stub: tuple[Stub, str], multi_stub: tuple[Stub, str], which: str,
) -> None:
    _, url = binary_stub if which == "binary" else multi_stub
    page = open_page(browser, url, PHONE)
    expect(page.locator("#model-card .chip").first).to_be_visible()
    no_horizontal_scroll(page, PHONE["width"])
    upload(page, "wide.png", images.png_bytes(900, 300, seed=4), "image/png")
    expect(page.locator("#status")).to_contain_text("Answered in")
    if which == "binary":
        expect(page.locator("#result .question")).to_have_text("Is it thriller?")
    else:
        expect(page.locator("#result .row[data-over='true']")).to_have_count(len(MULTI_OVER))
    no_horizontal_scroll(page, PHONE["width"])
    screenshot(page, f"web_page_phone_{which}.png")
    if which == "multi":
        page.set_viewport_size(DESKTOP)
        screenshot(page, "web_page_desktop_multi.png")
    page.context.close()


def overlay_shown(page: Page) -> dict[str, Any]:
    """The heatmap overlay as the browser has it: decoded, over the picture, in its box."""
    overlay = page.locator("#why-overlay")
    expect(overlay).to_be_visible()
    expect(overlay).to_have_attribute("src", re.compile(r"^data:image/png;base64,[A-Za-z0-9+/]{100,}"))
    page.wait_for_function("document.getElementById('why-overlay').complete "
                           "&& document.getElementById('why-overlay').naturalWidth > 0")
    box, under = overlay.bounding_box(), page.locator("#preview-img").bounding_box()
    assert box is not None and under is not None
    assert all(abs(box[k] - under[k]) <= 1 for k in ("x", "y", "width", "height")), (box, under)
    return page.evaluate("(() => { const o = document.getElementById('why-overlay');"
                         " return {src: o.src, label: o.dataset.label, width: o.naturalWidth, height: o.naturalHeight}; })()")


def test_why_overlays_each_tags_heatmap_on_the_picture(browser: Browser, multi_stub: tuple[Stub, str]) -> None:
    stub, url = multi_stub
    page = open_page(browser, url)
    expect(page.locator("#why")).to_be_hidden()  # nothing to explain before an answer
    upload(page, "street.png", images.png_bytes(120, 90, seed=2), "image/png")
    expect(page.locator("#result .row[data-over='true']")).to_have_count(len(MULTI_OVER))
    toggle = page.get_by_role("button", name="why?")
    expect(toggle).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#why-overlay")).to_be_hidden()
    toggle.click()
    expect(toggle).to_have_attribute("aria-pressed", "true")
    first = overlay_shown(page)
    assert stub.predictions[-1]["explain"] is True
    assert (first["label"], first["width"], first["height"]) == (MULTI_OVER[0], 120, 90)
    chooser = page.locator("#why-classes .why-class")
    expect(chooser).to_have_count(len(MULTI_OVER))
    expect(chooser.first).to_have_attribute("aria-pressed", "true")
    screenshot(page, "web_page_why_multi.png")
    chooser.nth(1).click()
    expect(chooser.nth(1)).to_have_attribute("aria-pressed", "true")
    second = overlay_shown(page)
    assert second["label"] == MULTI_OVER[1] and second["src"] != first["src"]

    toggle.click()  # off: the picture alone again
    expect(page.locator("#why-overlay")).to_be_hidden()
    expect(chooser.first).to_be_hidden()
    toggle.click()  # on again: the heatmaps already fetched, no new request
    asked = len(stub.predictions)
    expect(page.locator("#why-overlay")).to_be_visible()
    assert len(stub.predictions) == asked
    # a new picture while "why?" is on: its own heatmap follows its answer
    upload(page, "other.png", images.png_bytes(60, 80, seed=8), "image/png")
    expect(page.locator("#preview-img")).to_have_attribute("alt", "Preview of other.png")
    page.wait_for_function("document.getElementById('why-overlay').naturalWidth === 60")
    assert overlay_shown(page)["height"] == 80
    assert page.problems == []  # type: ignore[attr-defined]
    page.context.close()


def test_why_says_when_the_server_is_busy(browser: Browser, binary_stub: tuple[Stub, str]) -> None:
    stub, url = binary_stub
    stub.explain_busy = True
    try:
        page = open_page(browser, url)
        upload(page, "poster.png", images.png_bytes(80, 60, seed=1), "image/png")
        expect(page.locator("#result .question")).to_have_text("Is it thriller?")
        page.get_by_role("button", name="why?").click()
        status = page.locator("#why-status")
        expect(status).to_contain_text("every explanation slot is busy", timeout=15_000)
        expect(status).to_contain_text("HTTP 503")
        expect(page.locator("#why-overlay")).to_be_hidden()
        expect(page.locator("#result .question")).to_have_text("Is it thriller?")  # the answer stays
        page.context.close()
    finally:
        stub.explain_busy = False


# ---------------------------------------------------------------- the real app


@pytest.fixture(scope="module")
def real_app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``tagmill.serve.app`` serving a tiny real bundle (random weights), with one example."""
    import torch

    from tagmill.bundle import BundleMeta, save_bundle
    from tagmill.dataset.transforms import Preprocess
    from tagmill.models import create_classifier
    from tagmill.serve.app import create_app
    from tagmill.serve.config import ServeConfig

    torch.manual_seed(0)
    bundle = tmp_path_factory.mktemp("bundles") / "thriller-detector"
    model = create_classifier("test_efficientnet", 2, pretrained=False)
    meta = BundleMeta(architecture="test_efficientnet", task="single", classes=("other", "thriller"),
                      preprocess=Preprocess(input_size=48), metrics={"accuracy": 0.75, "split": "val"})
    save_bundle(str(bundle), model, meta)
    images.write(bundle / "examples" / "poster.png", images.png_bytes(64, 48, seed=9))
    app = create_app(ServeConfig(bundle=str(bundle), threads=1, decode_threads=1))
    with Server(app) as server:
        yield server.url


def test_the_page_against_the_real_app(browser: Browser, real_app_url: str) -> None:
    page = open_page(browser, real_app_url)
    card = page.locator("#model-card")
    expect(card).to_contain_text("thriller-detector")
    expect(card).to_contain_text("test_efficientnet")
    expect(card.locator(".chip")).to_have_text(["other", "thriller"])
    expect(card.locator(".metrics")).to_contain_text("75.0%")

    # the first answer may wait for the model to load: the page retries 503s by itself
    upload(page, "poster.png", images.png_bytes(80, 60, seed=1), "image/png")
    result = page.locator("#result")
    expect(result.locator(".question")).to_have_text("Is it thriller?", timeout=20_000)
    expect(result.locator(".big-pct")).to_have_text(re.compile(r"^[<>]?\d+(\.\d)?%$"))
    expect(result.locator(".row")).to_have_count(2)
    screenshot(page, "web_page_real_app.png")

    # "why?": the server's Grad-CAM overlay of the top class, over the picture
    page.get_by_role("button", name="why?").click()
    shown = overlay_shown(page)
    picked = result.locator(".verdict strong").inner_text()
    assert shown["label"] == picked and (shown["width"], shown["height"]) == (80, 60)
    screenshot(page, "web_page_real_app_why.png")
    page.get_by_role("button", name="why?").click()

    # the bundle's example, fetched from the same server and classified
    page.get_by_role("button", name="Classify the example poster.png").click()
    expect(page.locator("#preview-img")).to_have_attribute("alt", "Preview of poster.png")
    expect(page.locator("#status")).to_contain_text("Answered in")

    # the real server's error answer for bytes that are no image
    upload(page, "notes.txt", b"shot on a phone, not an image", "text/plain")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(re.compile(r"HTTP 4\d\d"))
    assert page.problems == []  # type: ignore[attr-defined]
    page.context.close()
