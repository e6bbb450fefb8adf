"""KServe's and Triton's Open Inference Protocol (v2), beside the SageMaker contract.

    GET  /v2/health/live                         200 while the process runs
    GET  /v2/health/ready                        200 once the model is loaded, else 503
    GET  /v2                                     server metadata
    GET  /v2/models/{name}[/versions/{version}]  model metadata: its input and outputs
    GET  /v2/models/{name}[/versions/{version}]/ready
    POST /v2/models/{name}[/versions/{version}]/infer

The model is served under ``--model-name`` (default: the bundle directory's name) and
its version is the bundle's (``models.model_version``); after a swap the name stays and
the version changes. It takes one input, ``image``: a BYTES tensor of shape [n] or
[n, 1], one encoded image per element (tensor layouts in ``v2_tensors.py``), and answers

    scores      FP32  [n, C]  every class's probability, in class order
    labels      BYTES [n, k]  the top-k class names, most probable first
    top_scores  FP32  [n, k]  their probabilities
    predicted   BOOL  [n, C]  the verdict per class: single-label the top class,
                              multi-label every tag at or above its tuned threshold

with k the request's ``parameters.top_k`` or the bundle's default. The class names in
class order are in the model metadata's ``parameters.classes``. Prediction routes need
the API key when the server has one (``Authorization: Bearer KEY`` or ``X-Api-Key``).
Errors are the protocol's ``{"error": "message"}``, with the status of the tagmill
error behind them (400 bad request, 401, 404 unknown model or version, 413, 422 an
element that is no image, 503 not ready).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Header, Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

import tagmill
from tagmill.serve import payloads
from tagmill.serve.errors import ModelNotFoundError
from tagmill.serve.models import ServedModel
from tagmill.serve.v2_tensors import (HEADER_LENGTH, INPUT_NAME, OUTPUTS, decompress, output_tensors, parse_request,
                                      render_answer)

if TYPE_CHECKING:
    from tagmill.serve.service import Service

PREFIX = "/v2"
BINARY_TYPE = "application/octet-stream"


def is_v2_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error body."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- shapes, for /openapi.json ----------------------------------------------------------


class V2Error(BaseModel):
    error: str


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="classes (in class order), task, default_top_k")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferAnswer(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


_TENSOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": [INPUT_NAME]},
        "datatype": {"type": "string", "enum": ["BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
        "data": {"type": "array", "items": {"type": "string", "description": "a base64-encoded image"}},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
    },
}
INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": f"One BYTES input named {INPUT_NAME!r}: base64 images in JSON 'data', or (binary tensor "
                       f"extension, with the {HEADER_LENGTH} header) the JSON header followed by the raw tensor bytes.",
        "content": {
            "application/json": {"schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _TENSOR_SCHEMA},
                    "outputs": {"type": "array", "items": {
                        "type": "object", "required": ["name"],
                        "properties": {"name": {"type": "string", "enum": list(OUTPUTS)},
                                       "parameters": {"type": "object",
                                                      "properties": {"binary_data": {"type": "boolean"}}}}}},
                    "parameters": {"type": "object", "properties": {
                        "top_k": {"type": "integer", "minimum": 1},
                        "binary_data_output": {"type": "boolean"}}},
                },
            }},
            BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

_DESCRIPTIONS = {
    400: "Malformed request: bad JSON, tensor, base64 or parameter",
    401: "Missing or wrong API key",
    404: "No model (or version) of that name here",
    413: "Request body (inflated) or image count larger than the server's limit",
    415: "A Content-Encoding other than gzip or deflate",
    422: "An element is not a usable image",
    503: "The model is not loaded yet, or the request queue is full; retry later",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": V2Error, "description": _DESCRIPTIONS[code]} for code in codes}


# --- routes -------------------------------------------------------------------------------


def add_routes(app: FastAPI, service: Service, guard: list[Any]) -> None:
    config = service.config
    name_of = config.model_name or ""
    auth = (401,) if config.api_key is not None else ()
    tags = ["open inference protocol (v2)"]

    def served(name: str, version: str | None) -> ServedModel:
        """The served model if it is the one asked for (404 otherwise, 503 while loading)."""
        if name != name_of:
            raise ModelNotFoundError(f"unknown model {name!r}; this server serves {name_of!r}")
        model = service.require_ready()
        if version is not None and version != model.version:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; it serves version {model.version}")
        return model

    @app.get(f"{PREFIX}/health/live", response_model=Live, tags=tags, summary="The server is live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(f"{PREFIX}/health/ready", response_model=Ready, responses=_errors(503), tags=tags,
             summary="The server is ready: its model is loaded")
    async def ready() -> dict[str, bool]:
        service.require_ready()
        return {"ready": True}

    @app.get(PREFIX, response_model=ServerMetadata, tags=tags, summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "tagmill", "version": tagmill.__version__, "extensions": ["binary_tensor_data"]}

    def metadata(name: str, version: str | None) -> dict[str, Any]:
        model = served(name, version)
        meta = model.meta
        classes = meta.num_classes
        return {
            "name": name_of,
            "versions": [model.version],
            "platform": f"tagmill_{config.backend}",
            "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": out, "datatype": kind, "shape": [-1, classes if per_class else -1]}
                        for out, (kind, per_class) in OUTPUTS.items()],
            "parameters": {"classes": list(meta.classes), "task": meta.task,
                           "default_top_k": min(meta.default_top_k, classes)},
        }

    def is_ready(name: str, version: str | None) -> dict[str, Any]:
        served(name, version)
        return {"name": name_of, "ready": True}

    async def infer(request: Request, name: str, version: str | None, header_length: int | None) -> Response:
        served(name, version)  # 404 before reading the body
        body = await payloads.read_body(request, config.max_body_bytes)
        body = payloads.require_nonempty(decompress(body, request.headers.get("content-encoding"), config.max_body_bytes))
        parsed = parse_request(body, header_length)
        model, predictions = await service.predict(parsed.images, top_k=parsed.top_k)
        content, json_length = render_answer(output_tensors(predictions, model.meta.classes), parsed.outputs,
                                             model_name=name_of, version=model.version, request_id=parsed.id)
        headers = {"X-Model-Version": model.version}
        if json_length is None:
            return Response(content, media_type="application/json", headers=headers)
        return Response(content, media_type=BINARY_TYPE, headers={**headers, HEADER_LENGTH: str(json_length)})

    metadata_errors = _errors(404, 503)
    infer_responses = {
        200: {"model": InferAnswer, "description": "the output tensors (JSON, or with binary data after the JSON header)",
              "content": {BINARY_TYPE: {"schema": {"type": "string", "format": "binary"}}},
              "headers": {"X-Model-Version": {"schema": {"type": "string"}}}},
        **_errors(400, *auth, 404, 413, 415, 422, 503),
    }
    # the one name the server answers to (it stays across swaps; a version does not)
    name_doc = Path(description="the served model's name", json_schema_extra={"enum": [name_of]})
    header_doc = Header(None, alias=HEADER_LENGTH, ge=1,
                        description="binary tensor extension: the length of the JSON header at the body's start")

    # each route twice: with and without an explicit version (tritonclient's model_version)
    for suffix, versioned in (("", False), ("/versions/{version}", True)):
        base = f"{PREFIX}/models/{{name}}{suffix}"
        which = " (this version)" if versioned else ""

        if versioned:
            async def get_metadata(version: str, name: str = name_doc) -> dict[str, Any]:
                return metadata(name, version)

            async def get_ready(version: str, name: str = name_doc) -> dict[str, Any]:
                return is_ready(name, version)

            async def post_infer(request: Request, version: str, name: str = name_doc,
                                 header_length: int | None = header_doc) -> Response:
                return await infer(request, name, version, header_length)
        else:
            async def get_metadata(name: str = name_doc) -> dict[str, Any]:  # type: ignore[misc]
                return metadata(name, None)

            async def get_ready(name: str = name_doc) -> dict[str, Any]:  # type: ignore[misc]
                return is_ready(name, None)

            async def post_infer(request: Request, name: str = name_doc,  # type: ignore[misc]
                                 header_length: int | None = header_doc) -> Response:
                return await infer(request, name, None, header_length)

        app.get(base, response_model=ModelMetadata, responses=metadata_errors, tags=tags,
                summary=f"Model metadata{which}")(get_metadata)
        app.get(f"{base}/ready", response_model=ModelReady, responses=metadata_errors, tags=tags,
                summary=f"The model is ready{which}")(get_ready)
        app.post(f"{base}/infer", dependencies=guard, response_class=Response, responses=infer_responses,
                 openapi_extra=INFER_BODY, tags=tags, summary=f"Classify images{which}")(post_infer)


__all__ = ["add_routes", "error_response", "is_v2_path"]
