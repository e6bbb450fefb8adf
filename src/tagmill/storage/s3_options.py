"""The S3FileSystem keyword arguments for the user's ``--storage-option``s, with
tagmill's defaults: a short connect timeout and few retries, so a dead endpoint fails
in seconds."""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any


from tagmill.errors import InputError


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


__all__ = ["S3_CONNECT_TIMEOUT", "S3_RETRIES", "s3_options"]
