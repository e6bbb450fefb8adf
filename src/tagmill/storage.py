"""Paths and URLs: every file tagmill reads or writes goes through here.

A location is a local path or any fsspec URL (``s3://bucket/prefix``, ``file://...``).
Writes are atomic: a reader never sees a half-written file under its final name.

S3 (and S3-compatible stores: MinIO, Ceph, R2...) takes credentials and the endpoint
from the standard places — ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and ``~/.aws/config``, an instance role, ``AWS_ENDPOINT_URL(_S3)`` —
plus ``--storage-option KEY=VALUE`` (``endpoint_url``, ``key``, ``secret``, ``profile``,
``anon=true``, ``region_name``, ``config_kwargs={"connect_timeout": 2}``...).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import posixpath
import tempfile
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs

from tagmill.errors import InputError, StorageError

# Options passed to every fsspec filesystem (endpoint URLs, profiles...). The CLI
# fills this from --storage-option; the library reads it in one place.
_storage_options: dict[str, Any] = {}


def set_storage_options(options: dict[str, Any]) -> None:
    _storage_options.clear()
    _storage_options.update(options)


def current_storage_options() -> dict[str, Any]:
    return dict(_storage_options)


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding ``location`` and the path inside it."""
    options = s3_options(_storage_options) if is_s3(location) else _storage_options
    try:
        return url_to_fs(location, **options)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {location}: {exc}") from exc


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def is_s3(location: str) -> bool:
    return location.startswith(("s3://", "s3a://"))


# --- S3 options -------------------------------------------------------------------

#: Connect timeout (seconds) when the user sets none: an unreachable host fails fast.
S3_CONNECT_TIMEOUT = 5
#: botocore retries when the user configures none (env, profile or option). s3fs
#: already retries each call 5 times itself, so one botocore retry keeps transient
#: errors covered while a dead endpoint fails in seconds, not the default ~10 s.
S3_RETRIES = {"max_attempts": 2, "mode": "standard"}

# Option names s3fs/fsspec take beyond S3FileSystem's own parameters.
_S3_EXTRA_OPTIONS = {"profile", "region_name", "use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
_S3_BOOL_OPTIONS = {
    "anon", "use_ssl", "requester_pays", "default_fill_cache", "version_aware", "cache_regions",
    "fixed_upload_size", "local_expiry_check", "use_listings_cache", "skip_instance_cache",
}
_S3_INT_OPTIONS = {"default_block_size", "max_concurrency", "max_paths"}


def s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """The S3FileSystem keyword arguments for the user's options, with tagmill's defaults.

    --storage-option values arrive as strings: booleans, numbers and the ``*_kwargs``
    dicts (JSON) are converted. The endpoint from the environment is passed explicitly
    so fsspec's instance cache never hands out a client for another endpoint. Listings
    are not cached: another process (a torchrun rank, ``tagmill serve``) may change
    the bucket, and a stale listing would hide its files.
    """
    result = {key: _s3_value(key, value) for key, value in options.items()}
    client_kwargs = dict(result.get("client_kwargs") or {})
    if "region_name" in result:  # a session option in botocore, a client one in s3fs
        client_kwargs.setdefault("region_name", result.pop("region_name"))
    if client_kwargs:
        result["client_kwargs"] = client_kwargs
    if not result.get("endpoint_url") and not client_kwargs.get("endpoint_url"):
        endpoint = _environment_endpoint()
        if endpoint:
            result["endpoint_url"] = endpoint
    config = dict(result.get("config_kwargs") or {})
    config.setdefault("connect_timeout", S3_CONNECT_TIMEOUT)
    if "retries" not in config and not _retries_configured(result.get("profile")):
        config["retries"] = dict(S3_RETRIES)
    result["config_kwargs"] = config
    result.setdefault("use_listings_cache", False)
    return result


@functools.cache
def _s3_option_names() -> frozenset[str]:
    from s3fs import S3FileSystem

    names = set(inspect.signature(S3FileSystem.__init__).parameters) - {"self", "kwargs", "session", "loop", "asynchronous"}
    return frozenset(names | _S3_EXTRA_OPTIONS)


def _s3_value(key: str, value: Any) -> Any:
    if key not in _s3_option_names():
        known = ", ".join(sorted(_s3_option_names()))
        raise InputError(f"unknown storage option {key!r} for s3:// (known: {known})")
    if not isinstance(value, str):
        return value
    if key in _S3_BOOL_OPTIONS:
        if value.strip().lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise InputError(f"storage option {key} expects true or false, got {value!r}")
        return value.strip().lower() in {"true", "1", "yes"}
    if key in _S3_INT_OPTIONS or key == "listings_expiry_time":
        try:
            return float(value) if key == "listings_expiry_time" else int(value)
        except ValueError:
            raise InputError(f"storage option {key} expects a number, got {value!r}") from None
    if key.endswith("_kwargs"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InputError(f"storage option {key} expects a JSON object, e.g. {key}={{\"a\": 1}}: {exc}") from None
        if not isinstance(parsed, dict):
            raise InputError(f"storage option {key} expects a JSON object, got {value!r}")
        return parsed
    return value


def _environment_endpoint() -> str | None:
    """botocore's own endpoint variables (S3-specific first), unless told to ignore them."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _retries_configured(profile: str | None) -> bool:
    """Whether the environment or the AWS config file already says how to retry."""
    if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
        return True
    profile = profile or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    return _profile_sets_retries(profile, os.environ.get("AWS_CONFIG_FILE"))


@functools.lru_cache(maxsize=16)
def _profile_sets_retries(profile: str | None, config_file: str | None) -> bool:
    # Cached: filesystem() runs for every file read, reading ~/.aws/config costs ~10 ms.
    try:
        import botocore.session

        # the profile's own settings: get_config_variable would answer botocore's defaults
        scoped = botocore.session.Session(profile=profile).get_scoped_config()
        return any(name in scoped for name in ("max_attempts", "retry_mode"))
    except Exception:  # a broken profile is reported by the first real request instead
        return False


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL, with '/' separators for URLs."""
    if is_local(base) and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/"))


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
            if code == "403" and is_s3(location):
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


def exists(location: str) -> bool:
    """Whether ``location`` exists. On S3 a missing bucket is an error, not ``False``:
    nothing can exist there, and "no dataset.json" would hide the real mistake."""
    fs, path = filesystem(location)
    with storage_errors(location):
        found = fs.exists(path)
        if not found and is_s3(location):
            _require_bucket(fs, location, path)
        return found


def isdir(location: str) -> bool:
    fs, path = filesystem(location)
    with storage_errors(location):
        found = fs.isdir(path)
        if not found and is_s3(location):
            _require_bucket(fs, location, path)
        return found


#: (endpoint, bucket) pairs seen to exist: a bucket is checked once per process.
_known_buckets: set[tuple[str, str]] = set()


def _require_bucket(fs: fsspec.AbstractFileSystem, location: str, path: str) -> None:
    """Raise StorageError if the bucket of an s3:// location does not exist."""
    bucket = path.split("/", 1)[0]
    key = (str(getattr(fs, "endpoint_url", None)), bucket)
    if not bucket or key in _known_buckets:
        return
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except (FileNotFoundError, PermissionError, OSError) as exc:
        # HEAD answers carry only a status: 404 is a missing bucket; a 403 bucket may
        # still hold readable keys, so only a 404 is reported here.
        if _status(exc) == 404 or isinstance(exc, FileNotFoundError):
            raise StorageError(f"{location}: bucket does not exist", hint="create the bucket first, or check its name") from exc
        if _status(exc) != 403:
            raise
        return
    _known_buckets.add(key)


def _status(exc: BaseException) -> int | None:
    for error in _exception_chain(exc):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status is not None:
                return int(status)
    return None


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with storage_errors(location):
        return fs.cat_file(path)


def read_text(location: str, encoding: str = "utf-8-sig") -> str:
    """Read a text file; the default encoding drops a UTF-8 byte-order mark."""
    data = read_bytes(location)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise StorageError(f"{location} is not {encoding} text: {exc}") from exc


def list_files(root: str) -> list[str]:
    """Every file under ``root``, as sorted '/'-separated paths relative to it."""
    fs, path = filesystem(root)
    with storage_errors(root):
        if not fs.isdir(path):
            if is_s3(root):
                _require_bucket(fs, root, path)
            raise StorageError(f"not a directory: {root}")
        if is_local(root):
            # os.walk is ~2x faster than fsspec's find (no per-file stat) on 250k files
            return sorted(_walk_local(path))
        found = fs.find(path)
    prefix = path.rstrip("/") + "/"
    return sorted(p[len(prefix):] if p.startswith(prefix) else p for p in found)


def _walk_local(path: str) -> Iterator[str]:
    for directory, _, names in os.walk(path, onerror=_raise):
        relative = os.path.relpath(directory, path)
        for name in names:
            yield name if relative == "." else f"{relative}/{name}".replace(os.sep, "/")


def _raise(error: OSError) -> None:
    raise error


def open_read(location: str) -> IO[bytes]:
    fs, path = filesystem(location)
    with storage_errors(location):
        return fs.open(path, "rb")


def remove(location: str) -> None:
    fs, path = filesystem(location)
    with storage_errors(location):
        if fs.exists(path):
            fs.rm(path)


def makedirs(location: str) -> None:
    """Create a folder. S3 has no folders: only check the bucket exists (s3fs would
    create a missing bucket, in whatever region and with whatever policy — never wanted)."""
    fs, path = filesystem(location)
    with storage_errors(location):
        if is_s3(location):
            _require_bucket(fs, location, path)
        else:
            fs.makedirs(path, exist_ok=True)


class AtomicFile:
    """A binary file that appears under its name only when committed.

    Local files are written beside the target and renamed over it (atomic on POSIX).
    Remote files are written to a local temporary file and uploaded in one put, so an
    interrupted write never leaves a partial object behind. As a context manager it
    commits on success and discards on error.
    """

    def __init__(self, location: str) -> None:
        self.location = location
        self._fs, self._path = filesystem(location)
        self._local = is_local(location)
        directory = os.path.dirname(self._path) if self._local else None
        with storage_errors(location):
            if directory:
                os.makedirs(directory, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + posixpath.basename(self._path), dir=directory)
        self.handle: IO[bytes] = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> int:
        return self.handle.write(data)

    def commit(self) -> None:
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            with storage_errors(self.location):
                if self._local:
                    # mkstemp creates 0600 files; give the result the usual permissions.
                    os.chmod(self._tmp, 0o666 & ~_umask())
                    os.replace(self._tmp, self._path)
                else:
                    self._fs.put_file(self._tmp, self._path)
        finally:
            self.discard()

    def discard(self) -> None:
        try:
            self.handle.close()  # flushes what is buffered: on a full disk that fails again
        except OSError:
            pass
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def __enter__(self) -> IO[bytes]:
        return self.handle

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(location: str) -> AtomicFile:
    """``with atomic_write(url) as f: f.write(...)`` — see :class:`AtomicFile`."""
    return AtomicFile(location)


def write_bytes(location: str, data: bytes) -> None:
    with atomic_write(location) as handle:
        handle.write(data)
