"""Request bodies in, answer bodies out: reading with a size limit, Content-Type and
Accept negotiation, and the SageMaker / tagmill answer formats.

SageMaker's image classifier answers a JSON list of probabilities in class order;
``application/json;verbose`` and ``application/jsonlines`` are its variants. The
``/predict`` route answers tagmill's own object (labels, scores, top-k).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from tagmill.bundle.predictor import Prediction
from tagmill.errors import InputError
from tagmill.serve.errors import NotAcceptableError, PayloadTooLargeError, UnsupportedMediaTypeError

#: Content types read as one encoded image. ``image/*`` covers jpeg, png, webp, gif,
#: bmp, tiff: the decoder decides, and answers 422 for bytes that are no image.
RAW_IMAGE_TYPES: tuple[str, ...] = ("application/x-image", "application/octet-stream")
DOCUMENTED_IMAGE_TYPES: tuple[str, ...] = ("application/x-image", "image/jpeg", "image/png", "image/webp")
JSON_TYPE = "application/json"
JSONLINES_TYPE = "application/jsonlines"
#: other names clients use for JSON lines, read as JSONLINES_TYPE
JSONLINES_ALIASES = frozenset({"application/jsonl", "application/x-jsonlines", "application/x-ndjson"})
MULTIPART_TYPE = "multipart/form-data"
#: Images in one JSON request. Each becomes a (3, S, S) float tensor before the model
#: runs (600 KB at 224 px), so the body limit alone would let 10 MB of tiny images
#: claim gigabytes.
MAX_INSTANCES = 64


class AnswerFormat(enum.Enum):
    """What /invocations answers, chosen from the Accept header."""

    JSON = "application/json"
    JSON_VERBOSE = "application/json;verbose"
    JSONLINES = "application/jsonlines"
    JSONLINES_VERBOSE = "application/jsonlines;verbose"

    @property
    def verbose(self) -> bool:
        return self in (AnswerFormat.JSON_VERBOSE, AnswerFormat.JSONLINES_VERBOSE)

    @property
    def lines(self) -> bool:
        return self in (AnswerFormat.JSONLINES, AnswerFormat.JSONLINES_VERBOSE)


# --- media types ---------------------------------------------------------------------


def parse_media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """``"Application/JSON; verbose; q=0.5"`` → ``("application/json", {"verbose": "", "q": "0.5"})``."""
    if not value:
        return "", {}
    kind, *params = value.split(";")
    parsed: dict[str, str] = {}
    for param in params:
        name, _, val = param.partition("=")
        if name.strip():
            parsed[name.strip().lower()] = val.strip().strip('"')
    return kind.strip().lower(), parsed


def is_image_type(kind: str) -> bool:
    return kind in RAW_IMAGE_TYPES or kind.startswith("image/")


def require_content_type(value: str | None, *, multipart: bool, json_instances: bool) -> str:
    """The request's media type if the route reads it, else 415."""
    kind, _ = parse_media_type(value)
    if kind in JSONLINES_ALIASES:
        kind = JSONLINES_TYPE
    if is_image_type(kind) or (json_instances and kind in (JSON_TYPE, JSONLINES_TYPE)) or (multipart and kind == MULTIPART_TYPE):
        return kind
    readable = ["application/x-image", "image/*"]
    if json_instances:
        readable += [JSON_TYPE, JSONLINES_TYPE]
    if multipart:
        readable.append(MULTIPART_TYPE)
    raise UnsupportedMediaTypeError(
        f"cannot read a body of type {kind or '(no Content-Type)'!r}; send one of {', '.join(readable)}"
    )


def choose_answer_format(accept: str | None) -> AnswerFormat:
    """Pick the answer format from an Accept header (q-values respected), or 406."""
    if not accept or not accept.strip():
        return AnswerFormat.JSON
    candidates: list[tuple[float, int, AnswerFormat]] = []
    for index, item in enumerate(accept.split(",")):
        kind, params = parse_media_type(item)
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        answer = _answer_for(kind, "verbose" in params)
        if answer is not None and quality > 0:
            candidates.append((-quality, index, answer))  # best quality first, then header order
    if not candidates:
        raise NotAcceptableError(
            f"cannot answer in {accept!r}; accepted: application/json, application/json;verbose, "
            "application/jsonlines, application/jsonlines;verbose"
        )
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _answer_for(kind: str, verbose: bool) -> AnswerFormat | None:
    if kind in ("*/*", "application/*", JSON_TYPE):
        return AnswerFormat.JSON_VERBOSE if verbose else AnswerFormat.JSON
    if kind == JSONLINES_TYPE or kind in JSONLINES_ALIASES:
        return AnswerFormat.JSONLINES_VERBOSE if verbose else AnswerFormat.JSONLINES
    return None


# --- bodies ------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit``:
    from Content-Length before reading, and while streaming (chunked uploads, or a
    Content-Length that lies)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise _too_large(limit)
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body is larger than {limit / 1024 / 1024:g} MB",
        hint="send a smaller image, or start the server with a larger --max-body-mb",
    )


def require_nonempty(body: bytes) -> bytes:
    if not body:
        raise InputError("the request body is empty; send an image")
    return body


def images_from_json(body: bytes) -> list[bytes]:
    """``{"instances": [{"b64": "..."}, ...]}`` → the decoded image bytes, in order."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON: {exc}") from exc
    instances = data.get("instances") if isinstance(data, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InputError('expected a JSON object {"instances": [{"b64": "<base64 image>"}, ...]} with at least one instance')
    return _decoded(instances)


def images_from_jsonlines(body: bytes) -> list[bytes]:
    """One ``{"b64": "..."}`` per line (what a batch transform job sends with
    ``SplitType=Line``, several records per request with ``BatchStrategy=MultiRecord``)
    → the decoded image bytes, in line order. Blank lines are skipped."""
    try:
        lines = body.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"the body is not UTF-8 JSON lines: {exc}") from exc
    instances = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            instances.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number} is not valid JSON: {exc}") from exc
    if not instances:
        raise InputError('expected one JSON object {"b64": "<base64 image>"} per line, and at least one line')
    return _decoded(instances)


def _decoded(instances: list[Any]) -> list[bytes]:
    if len(instances) > MAX_INSTANCES:
        raise PayloadTooLargeError(f"{len(instances)} instances in one request; at most {MAX_INSTANCES} are accepted",
                                   hint="split them over several requests")
    images = []
    for index, instance in enumerate(instances):
        encoded = instance.get("b64") if isinstance(instance, dict) else None
        if not isinstance(encoded, str):
            raise InputError(f'instance {index} must be an object {{"b64": "<base64 image>"}}')
        try:
            images.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"instance {index}: invalid base64: {exc}") from exc
    return images


async def image_from_multipart(request: Request, body: bytes) -> bytes:
    """The ``file`` field of a multipart/form-data body that was already read."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, replay)
    try:
        # the body is already bounded by max_body_mb; parts may be as large as the body
        form = await form_request.form(max_files=4, max_fields=32, max_part_size=max(len(body), 1))
    except MultiPartException as exc:
        raise InputError(f"malformed multipart body: {exc.message}") from exc
    except HTTPException as exc:  # starlette's answer to a missing boundary
        raise InputError(f"malformed multipart body: {exc.detail}") from exc
    try:
        field = form.get("file")
        if field is None:
            raise InputError("the multipart body has no 'file' field", hint="curl -F file=@photo.jpg ...")
        if isinstance(field, UploadFile):
            return await field.read()
        return field.encode("utf-8", "surrogateescape")  # a part sent without a filename
    finally:
        await form.close()


# --- answers -----------------------------------------------------------------------


def verbose(prediction: Prediction, classes: Sequence[str]) -> dict[str, Any]:
    """One image's verbose answer: every probability, with class names and the verdict."""
    return {
        "probabilities": prediction.probabilities,
        "classes": list(classes),
        "labels": prediction.labels,
        "predicted_label": prediction.top[0][0] if prediction.top else None,
        "top": [{"label": label, "score": score} for label, score in prediction.top],
    }


def render_invocation(
    predictions: Sequence[Prediction], classes: Sequence[str], answer: AnswerFormat, *, many: bool
) -> tuple[bytes, str]:
    """SageMaker-style answer body and its media type. ``many``: the request was a JSON
    list of instances, so JSON answers are lists even for one image."""
    items: list[Any] = [verbose(p, classes) if answer.verbose else p.probabilities for p in predictions]
    if answer.lines:
        text = "".join(_dumps(item) + "\n" for item in items)
        return text.encode("utf-8"), JSONLINES_TYPE
    return _dumps(items if many else items[0]).encode("utf-8"), JSON_TYPE


def predict_answer(prediction: Prediction, task: str) -> dict[str, Any]:
    return {
        "labels": prediction.labels,
        "scores": prediction.scores,
        "top": [{"label": label, "score": score} for label, score in prediction.top],
        "task": task,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)
