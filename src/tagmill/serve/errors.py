"""The HTTP-only corners of the exception tree.

They subclass :mod:`tagmill.errors`, so the server answers every error the same way
(``{"error": {"type", "message"}}`` with the class's ``http_status``). They live here,
not in ``tagmill.errors``, because nothing but the server can raise them.
"""

from __future__ import annotations

from tagmill.errors import InputError, TagmillError


class UnauthorizedError(InputError):
    """The API key is missing or wrong."""

    http_status = 401


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


__all__ = [
    "NotAcceptableError",
    "NotReadyError",
    "PayloadTooLargeError",
    "QueueFullError",
    "TooManyConnectionsError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
]
