"""The HTTP-only corners of the exception tree.

They subclass :mod:`tagmill.errors`, so the server answers every error the same way
(``{"error": {"type", "message"}}`` with the class's ``http_status``; the Open
Inference Protocol routes as ``{"error": "message"}``, the same status). They live
here, not in ``tagmill.errors``, because nothing but the server can raise them.
"""

from __future__ import annotations

from tagmill.errors import InputError, TagmillError


class UnauthorizedError(InputError):
    """The API key is missing or wrong."""

    http_status = 401


class ForbiddenError(InputError):
    """The route is closed on this server (the admin route of a server without an API key)."""

    http_status = 403


class ModelNotFoundError(InputError):
    """The Open Inference Protocol names a model (or version) this server does not serve."""

    http_status = 404


class BundleRefusedError(InputError):
    """A running server was asked to switch to a bundle it cannot load or check; the
    served model keeps answering. (At start-up the same faults are a BundleError.)"""

    http_status = 422


class IncompatibleBundleError(BundleRefusedError):
    """The new bundle loads, but its answers would mean something else to the server's
    clients (other classes, another task)."""

    http_status = 409


class NotAcceptableError(InputError):
    """The client accepts none of the answer formats the route can give."""

    http_status = 406


class PayloadTooLargeError(InputError):
    """The request body is larger than ``max_body_mb``."""

    http_status = 413


class UnsupportedMediaTypeError(InputError):
    """The request body's Content-Type is not one the route reads."""

    http_status = 415


class UnavailableError(TagmillError):
    """The server cannot take the request now; retrying later may work."""

    http_status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after_s = retry_after_s


class QueueFullError(UnavailableError):
    """``queue_size`` requests already wait for the model."""


class TooManyConnectionsError(UnavailableError):
    """A worker already holds ``max_connections`` open connections."""


class NotReadyError(UnavailableError):
    """The model is still loading, failed to load, or the server is shutting down."""


class ExplainBusyError(UnavailableError):
    """Every explanation slot of the worker is busy (``explain_concurrency``); plain
    predictions are not limited by them."""


class ExplanationUnsupportedError(InputError):
    """The served model cannot be explained: its bundle has no torch weights (an ONNX
    graph has no gradients), or its backbone family has no map Grad-CAM can weigh."""

    http_status = 409


class ExplanationUnavailableError(TagmillError):
    """This server cannot draw explanations: the grad-cam package (the ``explain``
    extra) is not installed."""

    http_status = 501


class SwapUnsupportedError(TagmillError):
    """This server cannot swap its model: several workers under uvicorn's own supervisor
    (no SO_REUSEPORT), which has no channel to tell every worker."""

    http_status = 501


__all__ = [
    "BundleRefusedError",
    "ExplainBusyError",
    "ExplanationUnavailableError",
    "ExplanationUnsupportedError",
    "ForbiddenError",
    "IncompatibleBundleError",
    "ModelNotFoundError",
    "NotAcceptableError",
    "NotReadyError",
    "PayloadTooLargeError",
    "QueueFullError",
    "SwapUnsupportedError",
    "TooManyConnectionsError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
]
