"""What went wrong with a file or URL, in words a user can act on.

s3fs and botocore fail in many shapes (OSError subclasses, botocore ClientErrors kept
as causes, bare 403s from HEAD requests, connection and credential errors);
:func:`storage_errors` turns each into a ``StorageError`` that names the location and
says what to check.
"""

from __future__ import annotations

import contextlib
import errno
import urllib.parse
from collections.abc import Iterator

from tagmill.errors import StorageError

#: URL schemes of S3 locations (as ``storage.is_s3`` knows them)
S3_SCHEMES = ("s3://", "s3a://")


@contextlib.contextmanager
def storage_errors(location: str) -> Iterator[None]:
    """Turn the many ways I/O fails (OSError, botocore errors...) into StorageError."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        error = storage_error(location, exc)
        if error is None:
            raise
        raise error from exc


def storage_error(location: str, exc: BaseException) -> StorageError | None:
    """The StorageError that explains ``exc`` for ``location``; None if it is no I/O error."""
    # First what the remote store said: s3fs turns its errors into OSError subclasses
    # (NoSuchBucket becomes FileNotFoundError) and keeps botocore's as the cause.
    remote = _remote_error(location, exc)
    if remote is not None:
        return remote
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"not found: {location}")
    if isinstance(exc, PermissionError):
        return StorageError(f"permission denied: {location} ({exc})")
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"no space left to write {location} ({exc.strerror})", hint="free some space, or write elsewhere")
    if isinstance(exc, OSError):
        return StorageError(f"cannot access {location}: {exc}")
    if _is_remote_library_error(exc):  # botocore/aiohttp errors have no common base we can import lazily
        return StorageError(f"cannot access {location}: {exc}")
    return None


_REMOTE_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "s3fs"}


def _is_remote_library_error(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] in _REMOTE_LIBRARIES


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


_CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass --storage-option key=... --storage-option secret=..."
_DENIED_HINT = "the credentials in use may not do this here (without s3:ListBucket, a missing key is denied too)"
_ENDPOINT_HINT = "check the endpoint (AWS_ENDPOINT_URL or --storage-option endpoint_url=...) and that it is reachable"

#: S3 error codes -> (what to tell the user, a hint). HEAD requests carry only the status.
_S3_CODES: dict[str, tuple[str, str | None]] = {
    "NoSuchBucket": ("bucket does not exist", "create the bucket first, or check its name"),
    "AccessDenied": ("access denied", _DENIED_HINT),
    "403": ("access denied", _DENIED_HINT),
    "AllAccessDisabled": ("access to this bucket is disabled", None),
    "InvalidAccessKeyId": ("the access key id is not known to this endpoint", _CREDENTIALS_HINT),
    "SignatureDoesNotMatch": ("the secret key does not match the access key id", _CREDENTIALS_HINT),
    "InvalidClientTokenId": ("the access key id is not known to this endpoint", _CREDENTIALS_HINT),
    "ExpiredToken": ("the credentials have expired", "refresh the session token or profile"),
    "TokenRefreshRequired": ("the credentials have expired", "refresh the session token or profile"),
    "RequestTimeTooSkewed": ("this machine's clock is too far from the server's", "synchronise the clock"),
    "PermanentRedirect": ("the bucket is in another region or behind another endpoint", "set AWS_DEFAULT_REGION or --storage-option region_name=..."),
    "AuthorizationHeaderMalformed": ("the request was signed for the wrong region", "set AWS_DEFAULT_REGION or --storage-option region_name=..."),
}


def _remote_error(location: str, exc: BaseException) -> StorageError | None:
    for error in _exception_chain(exc):
        code = _error_code(error)
        if code is not None:
            if code == "403" and location.startswith(S3_SCHEMES):
                code = _diagnose_forbidden(location) or code
            if code in _S3_CODES:
                reason, hint = _S3_CODES[code]
                return StorageError(f"{location}: {reason}", hint=hint)
            if code in {"NoSuchKey", "404"}:
                return StorageError(f"not found: {location}")
            if code:
                message = getattr(error, "response", {})["Error"].get("Message") or code
                return StorageError(f"{location}: {message} ({code})")
        if _is_remote_library_error(error):
            connection = _connection_error(location, error)
            if connection is not None:
                return connection
    return None


def _error_code(error: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ("NoSuchBucket", "403"...), else None."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        return str(response["Error"].get("Code", ""))
    return None


def _diagnose_forbidden(location: str) -> str | None:
    """Why S3 answered a bare 403 (HEAD replies have no body): ask again with a listing,
    whose error says whether the key id, the secret or the permissions are wrong."""
    from tagmill.storage import filesystem  # the path API imports this module

    fs, path = filesystem(location)
    bucket, _, key = path.partition("/")
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as exc:  # only its code matters here
        for error in _exception_chain(exc):
            code = _error_code(error)
            if code and code != "403":
                return code
    return None


def _connection_error(location: str, error: BaseException) -> StorageError | None:
    name = type(error).__name__
    endpoint = _endpoint_of(getattr(error, "kwargs", {}).get("endpoint_url"))
    if name in {"EndpointConnectionError", "ConnectionError", "ProxyConnectionError", "ConnectionClosedError"}:
        return StorageError(f"{location}: cannot connect to {endpoint}", hint=_ENDPOINT_HINT)
    if name == "ConnectTimeoutError":
        return StorageError(f"{location}: timed out connecting to {endpoint}", hint=_ENDPOINT_HINT)
    if name == "ReadTimeoutError":
        return StorageError(f"{location}: timed out waiting for {endpoint}", hint=_ENDPOINT_HINT)
    if name in {"NoCredentialsError", "PartialCredentialsError"}:
        return StorageError(f"{location}: no usable credentials found", hint=_CREDENTIALS_HINT + " (or anon=true for a public bucket)")
    if name == "ProfileNotFound":
        return StorageError(f"{location}: {error}", hint="check AWS_PROFILE or --storage-option profile=...")
    return None


def _endpoint_of(request_url: str | None) -> str:
    """'http://host:9000' from the request URL botocore reports (the key is noise)."""
    if not request_url:
        return "the endpoint"
    parts = urllib.parse.urlsplit(request_url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else request_url


def http_status(exc: BaseException) -> int | None:
    for error in _exception_chain(exc):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status is not None:
                return int(status)
    return None


__all__ = ["http_status", "storage_error", "storage_errors"]
