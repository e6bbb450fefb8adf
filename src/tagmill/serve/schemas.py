"""Shapes of the HTTP answers, for ``/openapi.json`` (and so for schemathesis and clients).

The routes write their JSON directly (the probabilities of a 1000-class model are not
worth a pydantic round trip per request); these models only document it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from tagmill.serve.payloads import DOCUMENTED_IMAGE_TYPES, JSON_TYPE, JSONLINES_TYPE, MULTIPART_TYPE


class ErrorDetail(BaseModel):
    type: str = Field(description="the error's class, e.g. UnreadableImageError")
    message: str
    hint: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class TopEntry(BaseModel):
    label: str
    score: float


class VerboseAnswer(BaseModel):
    """One image, with names: ``Accept: application/json;verbose``."""

    probabilities: list[float] = Field(description="every class, in class order")
    classes: list[str]
    labels: list[str] = Field(description="single-label: the top class; multi-label: every tag at or above its threshold")
    predicted_label: str | None = Field(description="the most probable class")
    top: list[TopEntry]


class InvocationAnswer(
    RootModel[list[float] | list[list[float]] | VerboseAnswer | list[VerboseAnswer]]
):
    """Probabilities in class order (SageMaker's image classifier); a list of them for a
    JSON request with instances; verbose objects with ``Accept: application/json;verbose``."""


class ExplainedClass(BaseModel):
    """Where the evidence for one class lies in the image (Grad-CAM, from the torch
    weights of the model that answered)."""

    label: str
    score: float = Field(description="the class's probability")
    overlay_png: str = Field(description="base64 PNG: the image with the heat drawn over it in colour (red: the "
                                         "strongest evidence), at most 512 px on its longer side")
    width: int = Field(description="the overlay's width in pixels (the image's, or shrunk with its aspect ratio)")
    height: int


class PredictAnswer(BaseModel):
    labels: list[str] = Field(description="single-label: the top class; multi-label: tags at or above the threshold")
    scores: dict[str, float] = Field(description="every class's probability")
    top: list[TopEntry] = Field(description="the top-k classes, most probable first")
    task: Literal["single", "multi"]
    model_version: str = Field(description="the version of the model that answered")
    explanations: list[ExplainedClass] | None = Field(
        None, description="only with `explain=true` (or `explain_class`): one heatmap per class explained: the "
                          "`explain_class` ones in the order asked, else each of `labels` (the most probable "
                          "first; the top class when no tag reached its threshold)")


class ModelInfo(BaseModel):
    """What the web page shows about the served model."""

    name: str
    version: str | None = Field(description="the served model's version; null until it is loaded")
    architecture: str
    task: Literal["single", "multi"]
    classes: list[str]
    thresholds: list[float] | None
    default_top_k: int
    metrics: dict[str, Any]
    input_size: int
    examples: list[str] = Field(description="URLs of example images shipped in the bundle's examples/ folder")
    backend: str
    runs_on: str | None = Field(description='what the model runs on, e.g. "torch on cpu" or '
                                            '"onnxruntime CUDAExecutionProvider"; null until it is loaded')
    api_key_required: bool
    tagmill_version: str


class Status(BaseModel):
    status: str


class ReadyStatus(Status):
    model: str = Field(description="the model's name on the Open Inference Protocol routes")
    model_version: str = Field(description="the version of the model that answers (a hash of its model.json)")
    bundle: str = Field(description="where the served bundle was loaded from")


class SwapRequest(BaseModel):
    """``POST /admin/model``: the bundle to serve from now on."""

    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(None, min_length=1, description="a bundle directory or URL on the server's side; "
                                                                "left out: the served bundle's location, read again")
    allow_class_change: bool = Field(False, description="accept a bundle with other classes or another task "
                                                        "(clients reading probabilities by position would misread them)")


class SwapAnswer(BaseModel):
    status: Literal["swapped", "unchanged"]
    version: str = Field(description="the version now served")
    previous_version: str
    bundle: str
    workers: int = Field(description="worker processes serving the version")


# --- request bodies (FastAPI cannot infer them: the routes read the raw body) -------

_BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
INSTANCES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instances"],
    "properties": {
        "instances": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["b64"],
                "properties": {"b64": {"type": "string", "description": "a base64-encoded image"}},
            },
        }
    },
}
INVOCATION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One encoded image, several as JSON instances, or one {\"b64\": ...} object per line "
                       "(JSON lines, as a batch transform job sends them).",
        "content": {**{kind: _BINARY for kind in DOCUMENTED_IMAGE_TYPES}, JSON_TYPE: {"schema": INSTANCES_SCHEMA},
                    JSONLINES_TYPE: {"schema": {"type": "string", "description": 'one {"b64": "<base64 image>"} per line'}}},
    }
}
PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A multipart upload (field `file`), or the image bytes as the body.",
        "content": {
            MULTIPART_TYPE: {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            **{kind: _BINARY for kind in DOCUMENTED_IMAGE_TYPES},
        },
    }
}
INVOCATION_OK: dict[str, Any] = {
    "model": InvocationAnswer,
    "description": "Probabilities; the format follows the Accept header",
    "content": {JSONLINES_TYPE: {"schema": {"type": "string", "description": "one JSON value per line and image"}}},
}

_DESCRIPTIONS = {
    400: "Malformed request: empty body, bad JSON or base64, bad query value",
    401: "Missing or wrong API key",
    403: "The admin routes are closed: the server runs without an API key",
    404: "Not found",
    406: "None of the Accept header's formats can be produced",
    409: "On /admin/model: the bundle's classes or task differ from the served model's; on /predict with "
         "explain: the served model cannot be explained (no torch weights, or an unsupported backbone family)",
    413: "Request body larger than the server's limit",
    415: "Content-Type the route does not read",
    422: "The bytes are not a usable image (corrupt, truncated, decompression bomb); on /admin/model, "
         "a bundle that cannot be loaded",
    501: "This server cannot swap its model (several workers without SO_REUSEPORT); on /predict with explain: "
         "the grad-cam package is not installed",
    503: "Model not ready, the request queue is full, or (explain) every explanation slot is busy; retry later",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI response entries for these error statuses, all with the error body."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[code]}
        if code == 503:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        if code == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[code] = entry
    return responses
