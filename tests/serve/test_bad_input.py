"""Every kind of bad request gets its status and the error body, and the server keeps
serving: each bad request is followed by a good one."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tagmill.bundle import Predictor
from tagmill.serve import ServeConfig, create_app
from tests import images
from tests.serve.conftest import X_IMAGE, error_of, serving

LIMIT_MB = 0.05  # ~52 KB: far above the test images, easy to exceed
GOOD = images.jpeg_bytes(64, 48, seed=7)
TOO_BIG = b"\xff\xd8\xff" + bytes(int(LIMIT_MB * 1024 * 1024) + 10)
B64 = base64.b64encode(GOOD).decode()


@pytest.fixture(scope="module")
def client(bundle: str) -> Iterator[TestClient]:
    with serving(create_app(ServeConfig(bundle=bundle, max_body_mb=LIMIT_MB))) as c:
        yield c


@pytest.fixture(autouse=True)
def still_serving(client: TestClient, reference: Predictor) -> Iterator[None]:
    yield
    response = client.post("/invocations", content=GOOD, headers=X_IMAGE)
    assert response.status_code == 200
    assert response.json() == pytest.approx(reference.predict_bytes([GOOD])[0].probabilities, abs=1e-6)


def chunks(data: bytes, size: int = 8192) -> Iterator[bytes]:
    """A body without Content-Length (chunked transfer): only counting while reading catches it."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


CASES = {
    # name: (path, request kwargs, status, error type)
    "empty body": ("/invocations", {"content": b"", "headers": X_IMAGE}, 400, "InputError"),
    "empty body on /predict": ("/predict", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "InputError"),
    "not an image": ("/invocations", {"content": b"<html>hello</html>", "headers": X_IMAGE}, 422, "UnreadableImageError"),
    "truncated jpeg": ("/invocations", {"content": images.truncated_jpeg_bytes(), "headers": X_IMAGE}, 422,
                       "UnreadableImageError"),
    "decompression bomb": ("/invocations", {"content": images.decompression_bomb_png_bytes(),
                                            "headers": {"Content-Type": "image/png"}}, 422, "UnreadableImageError"),
    "bomb on /predict": ("/predict", {"files": {"file": ("b.png", images.decompression_bomb_png_bytes(), "image/png")}},
                         422, "UnreadableImageError"),
    "text/plain": ("/invocations", {"content": GOOD, "headers": {"Content-Type": "text/plain"}}, 415,
                   "UnsupportedMediaTypeError"),
    "no content type": ("/invocations", {"content": GOOD}, 415, "UnsupportedMediaTypeError"),
    "json on /predict": ("/predict", {"json": {"instances": [{"b64": B64}]}}, 415, "UnsupportedMediaTypeError"),
    "multipart on /invocations": ("/invocations", {"files": {"file": ("a.jpg", GOOD, "image/jpeg")}}, 415,
                                  "UnsupportedMediaTypeError"),
    "too large": ("/invocations", {"content": TOO_BIG, "headers": X_IMAGE}, 413, "PayloadTooLargeError"),
    "too large, chunked": ("/invocations", {"content": chunks(TOO_BIG), "headers": X_IMAGE}, 413,
                           "PayloadTooLargeError"),
    "too large upload": ("/predict", {"files": {"file": ("big.jpg", TOO_BIG, "image/jpeg")}}, 413,
                         "PayloadTooLargeError"),
    "malformed json": ("/invocations", {"content": b'{"instances": [', "headers": {"Content-Type": "application/json"}},
                       400, "InputError"),
    "json without instances": ("/invocations", {"json": {"images": [B64]}}, 400, "InputError"),
    "empty instances": ("/invocations", {"json": {"instances": []}}, 400, "InputError"),
    "instance without b64": ("/invocations", {"json": {"instances": [{"url": "http://x"}]}}, 400, "InputError"),
    "bad base64": ("/invocations", {"json": {"instances": [{"b64": "not base64!"}]}}, 400, "InputError"),
    "json list": ("/invocations", {"json": [B64]}, 400, "InputError"),
    "json lines: a line that is no JSON": ("/invocations", {"content": f'{{"b64": "{B64}"}}\n{{"b64": '.encode(),
                                                             "headers": {"Content-Type": "application/jsonlines"}},
                                           400, "InputError"),
    "json lines: no lines": ("/invocations", {"content": b"\n\n", "headers": {"Content-Type": "application/jsonlines"}},
                             400, "InputError"),
    "json lines: a line without b64": ("/invocations", {"content": b'{"url": "x"}\n',
                                                        "headers": {"Content-Type": "application/x-ndjson"}},
                                       400, "InputError"),
    "too many instances": ("/invocations", {"json": {"instances": [{"b64": B64}] * 65}}, 413, "PayloadTooLargeError"),
    "one bad instance": ("/invocations", {"json": {"instances": [{"b64": B64}, {"b64": base64.b64encode(b"junk").decode()}]}},
                         422, "UnreadableImageError"),
    "top_k 0": ("/predict?top_k=0", {"content": GOOD, "headers": X_IMAGE}, 400, "InputError"),
    "top_k text": ("/predict?top_k=many", {"content": GOOD, "headers": X_IMAGE}, 400, "InputError"),
    "threshold above 1": ("/predict?threshold=1.5", {"content": GOOD, "headers": X_IMAGE}, 400, "InputError"),
    "multipart without file": ("/predict", {"data": {"image": "x"}, "files": {"other": ("a.jpg", GOOD, "image/jpeg")}},
                               400, "InputError"),
    "multipart without boundary": ("/predict", {"content": GOOD, "headers": {"Content-Type": "multipart/form-data"}},
                                   400, "InputError"),
    "empty upload": ("/predict", {"files": {"file": ("a.jpg", b"", "image/jpeg")}}, 400, "InputError"),
    "unknown accept": ("/invocations", {"content": GOOD, "headers": {**X_IMAGE, "Accept": "image/png"}}, 406,
                       "NotAcceptableError"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request(client: TestClient, name: str) -> None:
    path, kwargs, status, kind = CASES[name]

    response = client.post(path, **kwargs)

    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["type"] == kind and error["message"]
    if name.startswith("decompression bomb"):
        assert "decompression bomb" in error["message"]
    if name == "one bad instance":
        assert error["message"].startswith("instance 1:")


def test_wrong_method_and_unknown_route(client: TestClient) -> None:
    wrong = client.get("/invocations")
    missing = client.post("/nothing/here", content=GOOD, headers=X_IMAGE)
    assert wrong.status_code == 405 and error_of(wrong)["type"] == "MethodNotAllowed" and "POST" in wrong.headers["allow"]
    assert missing.status_code == 404 and error_of(missing)["type"] == "NotFound"


ODD_BUT_FINE = {
    "16-bit grey": images.grey16_png_bytes(),
    "cmyk": images.cmyk_jpeg_bytes(),
    "alpha": images.rgba_png_bytes(),
    "palette": images.palette_png_bytes(),
    "grey": images.grey_png_bytes(),
    "exif rotated": images.exif_rotated_jpeg_bytes(),
}


@pytest.mark.parametrize("name", list(ODD_BUT_FINE))
def test_unusual_images_are_served_like_predict_reads_them(client: TestClient, reference: Predictor, name: str) -> None:
    data = ODD_BUT_FINE[name]

    raw = client.post("/invocations", content=data, headers=X_IMAGE)
    upload = client.post("/predict", files={"file": ("x", data, "application/octet-stream")})

    assert raw.status_code == upload.status_code == 200, raw.text
    want = reference.predict_bytes([data])[0]
    assert raw.json() == pytest.approx(want.probabilities, abs=1e-6)
    assert upload.json()["scores"] == pytest.approx(want.scores, abs=1e-6)
