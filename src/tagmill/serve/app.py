"""The HTTP app: SageMaker's container contract, tagmill's own routes, the web page.

Routes only negotiate formats and read bodies (``payloads``); images and the model
are the :class:`Service`'s job. Every error, from any layer, leaves as
``{"error": {"type", "message"}}`` with the status its exception class carries (on
the Open Inference Protocol's routes, ``/v2/...``, as that protocol's
``{"error": "message"}``).

Every prediction answer says which model version answered it (``X-Model-Version``;
``/predict`` and ``/v2`` also in the body), and so do ``/readyz`` and ``/metrics``:
``POST /admin/model`` (or SIGHUP) swaps the model while the server runs.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Body, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import tagmill
from tagmill.errors import TagmillError
from tagmill.serve import payloads
from tagmill.serve import v2
from tagmill.serve.capture import CaptureContext
from tagmill.serve.config import ServeConfig, bundle_name
from tagmill.serve.control import SwapFunction
from tagmill.serve.errors import ForbiddenError, SwapUnsupportedError, UnauthorizedError, UnavailableError
from tagmill.serve.explanations import MAX_EXPLAINED, check_classes, classes_to_explain
from tagmill.bundle.predictor import Predictor
from tagmill.serve.metrics import MetricsMiddleware
from tagmill.serve.models import SwapOutcome
from tagmill.serve.schemas import (
    INVOCATION_BODY,
    INVOCATION_OK,
    PREDICT_BODY,
    ModelInfo,
    PredictAnswer,
    ReadyStatus,
    Status,
    SwapAnswer,
    SwapRequest,
    error_responses,
)
from tagmill.serve.service import Service

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
API_KEY_HEADER = "X-Api-Key"
#: on every prediction answer, /ping and /readyz: the version of the model that answered
MODEL_VERSION_HEADER = "X-Model-Version"
DESCRIPTION = """\
Image classification with a tagmill model bundle.

* `POST /invocations` and `POST /endpoints/{name}/invocations` speak SageMaker's
  image-classifier contract: send image bytes (`application/x-image`, `image/*`) or
  `{"instances": [{"b64": ...}, ...]}` as `application/json`; get the probabilities
  of every class in class order. `Accept: application/json;verbose` adds names,
  `application/jsonlines` gives one line per image.
* `POST /predict` takes a multipart upload (`file`) or raw bytes and answers labels,
  scores and top-k; `?explain=true` adds a heatmap overlay PNG per class or tag.
* `/v2/...` is KServe's and Triton's Open Inference Protocol (v2): the image bytes as a
  BYTES tensor named `image` (base64 strings in JSON `data`, or raw bytes with the
  binary tensor extension); outputs `scores`, `labels`, `top_scores`, `predicted`.
* `POST /admin/model` switches the served model to another bundle without downtime
  (needs the server's API key). Answers say which model version answered
  (`X-Model-Version`).
"""


def create_app(
    config: ServeConfig,
    *,
    predictor: Predictor | None = None,
    exit_on_load_error: bool = False,
    start_when_loaded: bool = False,
    swap: SwapFunction | None = None,
    reload_on_sighup: bool = False,
) -> FastAPI:
    """The app serving ``config.bundle``. The model loads in the background when the
    app starts (``/readyz`` answers 503 until then). ``predictor`` replaces loading the
    bundle (tests use it to run a model they control). ``exit_on_load_error`` ends
    the process when the model cannot load (servers); otherwise ``/readyz`` reports it.
    ``start_when_loaded`` holds the app's startup until the model is loaded: uvicorn
    listens only after startup, so a worker that shares its port with others takes no
    connection it would answer with 503.

    ``swap`` is how ``POST /admin/model`` switches models: by default this process's
    own model (one worker); a worker under tagmill's supervisor asks the supervisor,
    which swaps every worker (``control.py``). ``reload_on_sighup``: SIGHUP swaps to
    the served bundle's location read again (only for the process's main thread's
    loop: the single-process server)."""
    service = Service(config, predictor, exit_on_load_error=exit_on_load_error)
    if swap is None:
        swap = _local_swap(service) if config.workers == 1 else _no_swap

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        if start_when_loaded:
            await asyncio.to_thread(service.batcher.wait_ready)
        hup = reload_on_sighup and threading.current_thread() is threading.main_thread()
        if hup:
            _reload_on_sighup(swap)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            service.stop()

    app = FastAPI(title="tagmill", version=tagmill.__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    if service.capture is not None:
        app.add_middleware(CaptureContext)  # the request's path and content type, for what the capture records
    guard = _api_key_guard(config.api_key)
    _add_health_routes(app, service)
    _add_prediction_routes(app, service, guard)
    _add_admin_routes(app, service, swap, _admin_guard(config.api_key))
    v2.add_routes(app, service, guard)
    _add_page_routes(app, service)
    return app


def _local_swap(service: Service) -> SwapFunction:
    def swap(location: str | None, allow_class_change: bool) -> SwapOutcome:
        return service.swap_to(location, allow_class_change=allow_class_change)

    return swap


def _no_swap(location: str | None, allow_class_change: bool) -> SwapOutcome:
    raise SwapUnsupportedError(
        "this server's workers run under uvicorn's supervisor (no SO_REUSEPORT here), which cannot swap every worker",
        hint="restart the server on the new bundle",
    )


def _reload_on_sighup(swap: SwapFunction) -> None:
    """SIGHUP: read the served bundle's location again and swap if it holds another
    version (a ``s3://.../bundles/latest`` path that a pipeline rewrites)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            outcome = await asyncio.to_thread(swap, None, False)
            log.warning("SIGHUP: model %s, version %s (%s)", outcome.status, outcome.version, outcome.bundle)
        except TagmillError as exc:
            log.error("SIGHUP: model swap refused, the served model stays: %s", exc)

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)


# --- errors ------------------------------------------------------------------------


def error_response(status: int, kind: str, message: str, hint: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    detail: dict[str, Any] = {"type": kind, "message": message}
    if hint:
        detail["hint"] = hint
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _answer_error(request: Request, status: int, kind: str, message: str, hint: str | None = None,
                  headers: dict[str, str] | None = None) -> JSONResponse:
    """tagmill's error body, or the Open Inference Protocol's on its routes."""
    if v2.is_v2_path(request.url.path):
        return v2.error_response(status, message if not hint else f"{message} (hint: {hint})", headers)
    return error_response(status, kind, message, hint, headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def tagmill_error(request: Request, exc: TagmillError) -> JSONResponse:
        headers = {}
        if isinstance(exc, UnavailableError):
            headers["Retry-After"] = str(exc.retry_after_s)
        if isinstance(exc, UnauthorizedError):
            headers["WWW-Authenticate"] = 'Bearer realm="tagmill"'
        return _answer_error(request, exc.http_status, type(exc).__name__, exc.message, exc.hint, headers)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = http.HTTPStatus(exc.status_code).phrase
        return _answer_error(request, exc.status_code, phrase.replace(" ", ""), str(exc.detail), headers=exc.headers)

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A bad query value is the client's mistake like any other: 400, one error format.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()
        )
        return _answer_error(request, 400, "InputError", problems or "invalid request")

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server log (uvicorn logs it); the client learns only the kind
        return _answer_error(request, 500, "InternalError", f"internal error ({type(exc).__name__}); see the server log")

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


def _admin_guard(api_key: str | None) -> list[Any]:
    """The admin routes need the API key; a server without one keeps them closed (403):
    whoever reaches the port would otherwise choose the model it answers with."""
    if api_key is not None:
        return _api_key_guard(api_key)

    async def closed() -> None:
        raise ForbiddenError("the admin routes are closed on a server without an API key",
                             hint="start the server with --api-key (or TAGMILL_API_KEY), or send it SIGHUP "
                                  "to read its bundle's location again")

    return [Depends(closed)]


# --- routes --------------------------------------------------------------------------


def _version_header(version: str) -> dict[str, str]:
    return {MODEL_VERSION_HEADER: version}


_VERSION_HEADER_DOC = {MODEL_VERSION_HEADER: {"schema": {"type": "string"}, "description": "the model version that answered"}}


def _add_health_routes(app: FastAPI, service: Service) -> None:
    not_ready = error_responses(503)

    @app.get("/ping", response_model=Status, responses=not_ready, tags=["health"],
             summary="SageMaker health check: 200 once the model is loaded")
    async def ping() -> JSONResponse:
        model = service.require_ready()
        return JSONResponse({"status": "ready"}, headers=_version_header(model.version))

    @app.get("/livez", response_model=Status, tags=["health"], summary="The process is up")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", response_model=ReadyStatus, responses=not_ready, tags=["health"],
             summary="The model is loaded and takes requests; which version answers")
    async def readyz() -> JSONResponse:
        model = service.require_ready()
        return JSONResponse({"status": "ready", "model": service.config.model_name, "model_version": model.version,
                             "bundle": model.location}, headers=_version_header(model.version))

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "metrics"}})
    async def metrics() -> Response:
        content, media_type = service.metrics.render()
        return Response(content, media_type=media_type)


def _add_prediction_routes(app: FastAPI, service: Service, guard: list[Any]) -> None:
    config = service.config
    auth_errors = (401,) if config.api_key is not None else ()
    invocation_responses = {200: {**INVOCATION_OK, "headers": _VERSION_HEADER_DOC},
                            **error_responses(400, *auth_errors, 406, 413, 415, 422, 503)}

    async def invoke(request: Request) -> Response:
        answer = payloads.choose_answer_format(request.headers.get("accept"))
        kind = payloads.require_content_type(request.headers.get("content-type"), multipart=False, json_instances=True)
        body = payloads.require_nonempty(await payloads.read_body(request, config.max_body_bytes))
        many = kind in (payloads.JSON_TYPE, payloads.JSONLINES_TYPE)
        if kind == payloads.JSONLINES_TYPE:  # batch transform: one image per line, answered line by line
            images = payloads.images_from_jsonlines(body)
        else:
            images = payloads.images_from_json(body) if many else [body]
        model, predictions = await service.predict(images)
        content, media_type = payloads.render_invocation(predictions, model.meta.classes, answer, many=many)
        return Response(content, media_type=media_type, headers=_version_header(model.version))

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
              responses={200: {"model": PredictAnswer, "description": "labels, scores and top-k",
                               "headers": _VERSION_HEADER_DOC},
                         **error_responses(400, *auth_errors, 409, 413, 415, 422, 501, 503)},
              openapi_extra=PREDICT_BODY, tags=["predict"], summary="Labels, scores and top-k for one image")
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, le=100_000, description="how many classes `top` lists (default: the bundle's)"),
        threshold: float | None = Query(None, ge=0.0, le=1.0,
                                        description="multi-label: one threshold for every tag (default: the bundle's tuned ones)"),
        explain: bool = Query(False, description="add `explanations`: a heatmap overlay (Grad-CAM) per returned class "
                                                 "or tag; limited per worker (--explain-concurrency), 503 when busy"),
        explain_class: list[str] | None = Query(
            None, max_length=MAX_EXPLAINED,
            description=f"explain these classes instead (repeatable, at most {MAX_EXPLAINED}); implies explain=true"),
    ) -> JSONResponse:
        kind = payloads.require_content_type(request.headers.get("content-type"), multipart=True, json_instances=False)
        body = payloads.require_nonempty(await payloads.read_body(request, config.max_body_bytes))
        if kind == payloads.MULTIPART_TYPE:
            body = payloads.require_nonempty(await payloads.image_from_multipart(request, body))
        if not (explain or explain_class):
            model, (prediction,) = await service.predict([body], top_k=top_k, threshold=threshold)
            answer = {**payloads.predict_answer(prediction, model.meta.task), "model_version": model.version}
            return JSONResponse(answer, headers=_version_header(model.version))
        if explain_class:
            check_classes(explain_class, service.meta.classes)  # a wrong class: 400 before any work
        async with service.explainer.admit():  # 503 when every slot is busy: predictions are not held up
            model, (prediction,) = await service.predict([body], top_k=top_k, threshold=threshold)
            # the model that answered explains, so heatmaps and scores agree across a swap
            chosen = classes_to_explain(prediction, explain_class, model.meta.classes)
            explanations = await service.explainer.run(model, body, chosen)
        answer = {**payloads.predict_answer(prediction, model.meta.task), "model_version": model.version,
                  "explanations": explanations}
        return JSONResponse(answer, headers=_version_header(model.version))


def _add_admin_routes(app: FastAPI, service: Service, swap: SwapFunction, guard: list[Any]) -> None:
    @app.post("/admin/model", dependencies=guard, response_model=SwapAnswer, tags=["admin"],
              responses={200: {"description": "the bundle is served (or was already)", "headers": _VERSION_HEADER_DOC},
                         **error_responses(400, 401, 403, 409, 422, 501, 503)},
              summary="Switch to another bundle without downtime")
    async def swap_model(body: SwapRequest = Body(...)) -> JSONResponse:
        """Load the bundle beside the served model, check it, and swap: requests in flight
        finish on the old model. A broken bundle (422) or one with other classes (409)
        is refused and the old model keeps serving. With several workers, every worker
        swaps, one at a time, before this answers."""
        outcome = await asyncio.to_thread(swap, body.bundle, body.allow_class_change)
        return JSONResponse(outcome.as_dict(), headers=_version_header(outcome.version))


def _add_page_routes(app: FastAPI, service: Service) -> None:
    config = service.config

    @app.get("/api/model", response_model=ModelInfo, tags=["page"], summary="The served model, for the web page")
    async def model_info() -> dict[str, Any]:
        model = service.current
        meta = service.meta
        return {
            "name": bundle_name(model.location if model is not None else config.bundle),
            "version": None if model is None else model.version,
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
