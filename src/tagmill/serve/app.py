"""The HTTP app: SageMaker's container contract, tagmill's own routes, the web page.

Routes only negotiate formats and read bodies (``payloads``); images and the model
are the :class:`Service`'s job. Every error, from any layer, leaves as
``{"error": {"type", "message"}}`` with the status its exception class carries.
"""

from __future__ import annotations

import asyncio
import hmac
import http
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import tagmill
from tagmill.errors import TagmillError
from tagmill.serve import payloads
from tagmill.serve.config import ServeConfig
from tagmill.serve.errors import UnauthorizedError, UnavailableError
from tagmill.bundle.predictor import Predictor
from tagmill.serve.metrics import MetricsMiddleware
from tagmill.serve.schemas import (
    INVOCATION_BODY,
    INVOCATION_OK,
    PREDICT_BODY,
    ModelInfo,
    PredictAnswer,
    Status,
    error_responses,
)
from tagmill.serve.service import Service, bundle_name

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_HEADER = "X-Api-Key"
DESCRIPTION = """\
Image classification with a tagmill model bundle.

* `POST /invocations` and `POST /endpoints/{name}/invocations` speak SageMaker's
  image-classifier contract: send image bytes (`application/x-image`, `image/*`) or
  `{"instances": [{"b64": ...}, ...]}` as `application/json`; get the probabilities
  of every class in class order. `Accept: application/json;verbose` adds names,
  `application/jsonlines` gives one line per image.
* `POST /predict` takes a multipart upload (`file`) or raw bytes and answers labels,
  scores and top-k.
"""


def create_app(
    config: ServeConfig,
    *,
    predictor: Predictor | None = None,
    exit_on_load_error: bool = False,
    start_when_loaded: bool = False,
) -> FastAPI:
    """The app serving ``config.bundle``. The model loads in the background when the
    app starts (``/readyz`` answers 503 until then). ``predictor`` replaces loading the
    bundle (tests use it to run a model they control). ``exit_on_load_error`` ends
    the process when the model cannot load (servers); otherwise ``/readyz`` reports it.
    ``start_when_loaded`` holds the app's startup until the model is loaded: uvicorn
    listens only after startup, so a worker that shares its port with others takes no
    connection it would answer with 503."""
    service = Service(config, predictor, exit_on_load_error=exit_on_load_error)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        if start_when_loaded:
            await asyncio.to_thread(service.batcher.wait_ready)
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="tagmill", version=tagmill.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    _add_health_routes(app, service)
    _add_prediction_routes(app, service, _api_key_guard(config.api_key))
    _add_page_routes(app, service)
    return app


# --- errors ------------------------------------------------------------------------


def error_response(status: int, kind: str, message: str, hint: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    detail: dict[str, Any] = {"type": kind, "message": message}
    if hint:
        detail["hint"] = hint
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def tagmill_error(_: Request, exc: TagmillError) -> JSONResponse:
        headers = {}
        if isinstance(exc, UnavailableError):
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, UnauthorizedError):
            headers["WWW-Authenticate"] = 'Bearer realm="tagmill"'
        return error_response(exc.http_status, type(exc).__name__, exc.message, exc.hint, headers)

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = http.HTTPStatus(exc.status_code).phrase
        return error_response(exc.status_code, phrase.replace(" ", ""), str(exc.detail), headers=exc.headers)

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # A bad query value is the client's mistake like any other: 400, one error format.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()
        )
        return error_response(400, "InputError", problems or "invalid request")

    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server log (uvicorn logs it); the client learns only the kind
        return error_response(500, "InternalError", f"internal error ({type(exc).__name__}); see the server log")

    app.add_exception_handler(TagmillError, tagmill_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error)


def _api_key_guard(api_key: str | None) -> list[Any]:
    """Route dependencies that demand the key; none when no key is configured (then an
    ``Authorization`` header, e.g. boto3's SigV4 signature, is simply ignored)."""
    if api_key is None:
        return []
    expected = api_key.encode("utf-8")
    header_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the server's --api-key")
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key as a bearer token")

    async def require_key(
        key: str | None = Security(header_key),
        credentials: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> None:
        given = key if key is not None else (credentials.credentials if credentials is not None else None)
        # compare_digest: the time taken does not tell how much of a guess was right
        if given is None or not hmac.compare_digest(given.encode("utf-8"), expected):
            raise UnauthorizedError(
                "missing or wrong API key" if given is not None else "this server needs an API key",
                hint=f"send '{API_KEY_HEADER}: KEY' or 'Authorization: Bearer KEY'",
            )

    return [Depends(require_key)]


# --- routes --------------------------------------------------------------------------


def _add_health_routes(app: FastAPI, service: Service) -> None:
    not_ready = error_responses(503)

    @app.get("/ping", response_model=Status, responses=not_ready, tags=["health"],
             summary="SageMaker health check: 200 once the model is loaded")
    async def ping() -> dict[str, str]:
        service.require_ready()
        return {"status": "ready"}

    @app.get("/livez", response_model=Status, tags=["health"], summary="The process is up")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", response_model=Status, responses=not_ready, tags=["health"],
             summary="The model is loaded and takes requests")
    async def readyz() -> dict[str, str]:
        service.require_ready()
        return {"status": "ready"}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "metrics"}})
    async def metrics() -> Response:
        content, media_type = service.metrics.render()
        return Response(content, media_type=media_type)


def _add_prediction_routes(app: FastAPI, service: Service, guard: list[Any]) -> None:
    config = service.config
    classes = service.meta.classes
    auth_errors = (401,) if config.api_key is not None else ()
    invocation_responses = {200: INVOCATION_OK, **error_responses(400, *auth_errors, 406, 413, 415, 422, 503)}

    async def invoke(request: Request) -> Response:
        answer = payloads.choose_answer_format(request.headers.get("accept"))
        kind = payloads.require_content_type(request.headers.get("content-type"), multipart=False, json_instances=True)
        body = payloads.require_nonempty(await payloads.read_body(request, config.max_body_bytes))
        many = kind in (payloads.JSON_TYPE, payloads.JSONLINES_TYPE)
        if kind == payloads.JSONLINES_TYPE:  # batch transform: one image per line, answered line by line
            images = payloads.images_from_jsonlines(body)
        else:
            images = payloads.images_from_json(body) if many else [body]
        predictions = await service.predict(images)
        content, media_type = payloads.render_invocation(predictions, classes, answer, many=many)
        return Response(content, media_type=media_type)

    @app.post("/invocations", dependencies=guard, responses=invocation_responses, response_class=Response,
              openapi_extra=INVOCATION_BODY, tags=["sagemaker"], summary="Classify images (SageMaker container contract)")
    async def invocations(request: Request) -> Response:
        return await invoke(request)

    @app.post("/endpoints/{name}/invocations", dependencies=guard, responses=invocation_responses,
              response_class=Response, openapi_extra=INVOCATION_BODY, tags=["sagemaker"],
              summary="Classify images (the path boto3's sagemaker-runtime invoke_endpoint calls)")
    async def endpoint_invocations(request: Request, name: str) -> Response:
        return await invoke(request)  # one model per server: the endpoint name is not checked

    @app.post("/predict", dependencies=guard, response_class=JSONResponse,
              responses={200: {"model": PredictAnswer, "description": "labels, scores and top-k"},
                         **error_responses(400, *auth_errors, 413, 415, 422, 503)},
              openapi_extra=PREDICT_BODY, tags=["predict"], summary="Labels, scores and top-k for one image")
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, le=100_000, description="how many classes `top` lists (default: the bundle's)"),
        threshold: float | None = Query(None, ge=0.0, le=1.0,
                                        description="multi-label: one threshold for every tag (default: the bundle's tuned ones)"),
    ) -> JSONResponse:
        kind = payloads.require_content_type(request.headers.get("content-type"), multipart=True, json_instances=False)
        body = payloads.require_nonempty(await payloads.read_body(request, config.max_body_bytes))
        if kind == payloads.MULTIPART_TYPE:
            body = payloads.require_nonempty(await payloads.image_from_multipart(request, body))
        (prediction,) = await service.predict([body], top_k=top_k, threshold=threshold)
        return JSONResponse(payloads.predict_answer(prediction, service.meta.task))


def _add_page_routes(app: FastAPI, service: Service) -> None:
    meta, config = service.meta, service.config

    @app.get("/api/model", response_model=ModelInfo, tags=["page"], summary="The served model, for the web page")
    async def model_info() -> dict[str, Any]:
        return {
            "name": bundle_name(config.bundle),
            "architecture": meta.architecture,
            "task": meta.task,
            "classes": list(meta.classes),
            "thresholds": None if meta.thresholds is None else list(meta.thresholds),
            "default_top_k": meta.default_top_k,
            "metrics": meta.metrics,
            "input_size": meta.preprocess.input_size,
            "examples": [f"/examples/{quote(name)}" for name in service.examples],
            "backend": config.backend,
            "runs_on": service.runs_on,
            "api_key_required": config.api_key is not None,
            "tagmill_version": tagmill.__version__,
        }

    @app.get("/examples/{name}", include_in_schema=False)
    async def example(name: str) -> FileResponse:
        path = service.examples.get(name)  # only listed names: no path ever comes from the URL
        if path is None:
            raise StarletteHTTPException(404, f"no example image named {name!r}")
        return FileResponse(path)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            raise StarletteHTTPException(404, "the web page is not installed")
        return FileResponse(index, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR, html=True), name="static")


__all__ = ["create_app", "error_response"]
