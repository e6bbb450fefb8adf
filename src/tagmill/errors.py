"""The one exception tree of tagmill.

Every error a user can cause is a :class:`TagmillError`. Each class knows the exit
code the CLI returns for it and the HTTP status the server answers with, so the two
front ends never disagree about what went wrong.

    TagmillError                      exit 1   HTTP 500
    ├── InputError                    exit 2   HTTP 400   bad options or values
    │   ├── SourceError               exit 3   HTTP 400   an import source cannot be read as asked
    │   ├── LabelRuleError            exit 2   HTTP 400   a --derive rule does not parse or names unknown tags
    │   ├── UnreadableImageError      exit 2   HTTP 422   bytes that are not a usable image
    │   └── WeightsNotFoundError      exit 9   HTTP 400   pretrained weights asked for cannot be found
    ├── DatasetError                  exit 4   HTTP 500   a packed dataset is missing, incomplete or corrupt
    │   └── EmptyDatasetError         exit 5   HTTP 500   an import would leave nothing trainable
    ├── StorageError                  exit 6   HTTP 502   a path or URL cannot be read or written
    ├── CheckpointError               exit 7   HTTP 500   a training checkpoint cannot be read back
    └── BundleError                   exit 8   HTTP 500   a model bundle is incomplete or inconsistent

The server adds HTTP-only subclasses (401, 406, 413, 415, 503) in
:mod:`tagmill.serve.errors`; nothing outside the server can raise them.
"""

from __future__ import annotations


class TagmillError(Exception):
    """Base of every error tagmill reports to a user."""

    exit_code: int = 1
    http_status: int = 500

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        if hint is None:
            message, hint = _unwrap_worker_text(message)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # pickled across process pools (doctor's image scan): keep the hint, not just args
        return _rebuild, (type(self), self.message, self.hint)


class InputError(TagmillError):
    """Options or values given by the user are invalid."""

    exit_code = 2
    http_status = 400


class SourceError(InputError):
    """An import source does not exist, or cannot be read in the format asked for."""

    exit_code = 3


class LabelRuleError(InputError):
    """A label rule (``--derive``) does not parse, or names tags the data does not have."""


class UnreadableImageError(InputError):
    """Bytes that cannot be decoded into a usable image (corrupt, truncated, a bomb...)."""

    http_status = 422

    def __init__(self, message: str, *, reason: str = "unreadable", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        #: short machine-readable category used in import reports ("unreadable", "bomb", ...)
        self.reason = reason


#: how torch's DataLoader re-raises a worker's exception: the same class, built from one
#: string that wraps the worker's whole traceback
_WORKER_PREFIX, _WORKER_TRACEBACK = "Caught ", "\nOriginal Traceback (most recent call last):"


def _rebuild(cls: type[TagmillError], message: str, hint: str | None) -> TagmillError:
    return cls(message, hint=hint)


def _unwrap_worker_text(text: str) -> tuple[str, str | None]:
    """The message and hint of a TagmillError raised in a data-loader worker process.

    torch re-raises it in the main process as ``type(exc)(wrapper_text)``: the class (so
    the exit code) survives, but the message becomes a traceback with ``str(exc)``
    (message, then "  hint: ...") on its last lines. Anything else is returned as is.
    """
    if not (text.startswith(_WORKER_PREFIX) and _WORKER_TRACEBACK in text):
        return text, None
    marker = "tagmill.errors."
    tail = text[text.rfind(marker):] if marker in text else ""
    original = tail.split(": ", 1)[1].strip() if ": " in tail else ""
    if not original:
        return text, None
    message, _, hint = original.partition("\n  hint: ")
    return message, hint or None


class WeightsNotFoundError(InputError):
    """Pretrained weights were asked for and none of the places they may come from has them."""

    exit_code = 9


class DatasetError(TagmillError):
    """A packed dataset is missing, incomplete (no dataset.json) or fails its checksums."""

    exit_code = 4


class EmptyDatasetError(DatasetError):
    """An import would produce a dataset that cannot be trained on."""

    exit_code = 5


class StorageError(TagmillError):
    """A local path or fsspec URL cannot be read or written (missing, permissions, auth)."""

    exit_code = 6
    http_status = 502


class CheckpointError(TagmillError):
    """A training checkpoint is missing, damaged, or belongs to another run."""

    exit_code = 7


class BundleError(TagmillError):
    """A model bundle lacks model.json, or its weights do not match what model.json says."""

    exit_code = 8


class QuantizationError(BundleError):
    """A quantized (INT8) graph was refused: it costs more of the validation metric than
    the user allowed. The bundle keeps its fp32 graphs."""

    exit_code = 10


__all__ = [
    "BundleError",
    "CheckpointError",
    "QuantizationError",
    "TagmillError",
    "InputError",
    "SourceError",
    "LabelRuleError",
    "UnreadableImageError",
    "DatasetError",
    "EmptyDatasetError",
    "StorageError",
    "WeightsNotFoundError",
]
