"""Files from the Hugging Face hub: its local cache first, the network only when allowed.

timm publishes its pretrained weights as hub repositories (``timm/resnet50.a1_in1k``
holds ``model.safetensors`` and ``config.json``). ``huggingface_hub`` keeps what it
downloaded in a cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``) that can be copied between machines; ``HF_HUB_OFFLINE=1``
forbids the network. huggingface_hub reads those variables once, when it is imported;
tagmill reads them at each call (same names, same precedence), so a process that sets
them later (a test, a notebook) is obeyed too. (The reverse is not: a process that
imported huggingface_hub while offline stays offline for it.)

Every failure is a :class:`WeightsNotFoundError` listing what was tried, because a user
on an offline machine needs to know where the file was looked for to put it there.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tagmill.errors import WeightsNotFoundError

#: what timm's hub repositories hold, in the order timm itself prefers them
#: (safetensors cannot run code; the pickle is read with weights_only=True anyway)
WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
#: seconds to wait for the hub's first answer; huggingface_hub's default is 10 per
#: file, and a firewalled machine would wait that long for every file tried
ETAG_TIMEOUT_S = 5.0


def cache_dir() -> Path:
    """The hub cache huggingface_hub would use with the environment as it is now."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[variable])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def offline() -> bool:
    """True when the environment forbids downloads (``HF_HUB_OFFLINE``, as huggingface_hub reads it)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def fetch(repo_id: str, filenames: tuple[str, ...], *, what: str) -> Path:
    """The first of ``filenames`` that ``repo_id`` has: from the cache, else downloaded
    unless offline. ``what`` names the thing for the error ("weights for resnet50")."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    cache = cache_dir()
    for filename in filenames:
        try:
            path = hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=True)
        except LocalEntryNotFoundError:
            continue
        return Path(path)
    tried = [f"the Hugging Face cache {cache} ({', '.join(f'{repo_id}/{f}' for f in filenames)}): not there"]
    if offline():
        tried.append("downloading: not tried, HF_HUB_OFFLINE is set")
        raise _not_found(what, repo_id, tried)
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or None
    unreachable = _unreachable(endpoint or constants.ENDPOINT)  # the hub's own default address
    if unreachable:
        tried.append(f"downloading from {endpoint or constants.ENDPOINT}: {unreachable}")
        raise _not_found(what, repo_id, tried)
    for filename in filenames:
        try:
            path = hf_hub_download(repo_id, filename, cache_dir=cache, endpoint=endpoint, etag_timeout=ETAG_TIMEOUT_S)
        except RemoteEntryNotFoundError:
            continue  # the repository exists without this file: try the next name
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end the search the same way
            # huggingface_hub words an unreachable hub as "not in the local cache"; the cause says why
            reason = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
            tried.append(f"downloading {repo_id}/{filename} from {endpoint or 'the hub'}: {_first_line(reason)}")
            raise _not_found(what, repo_id, tried) from exc
        return Path(path)
    tried.append(f"downloading: {repo_id} has none of {', '.join(filenames)}")
    raise _not_found(what, repo_id, tried)


def read_config(repo_id: str) -> dict[str, Any]:
    """``config.json`` of a timm hub repository (its architecture and pretrained_cfg)."""
    found = fetch(repo_id, (CONFIG_FILE,), what=f"the configuration of {repo_id}")
    try:
        config = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsNotFoundError(f"cannot read {found}: {_first_line(exc)}",
                                   hint=f"delete {found.parent} from the hub cache and fetch it again") from exc
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise WeightsNotFoundError(f"{found} names no architecture: not a timm model repository",
                                   hint="hf-hub: names must point at repositories saved by timm (push_to_hf_hub)")
    return config


def cached_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of ``filenames`` the cache holds for ``repo_id`` (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir())
        if isinstance(path, str):
            return Path(path)
    return None


def cached_config(repo_id: str) -> dict[str, Any] | None:
    """``config.json`` of ``repo_id`` when the cache has it (never downloads); None otherwise."""
    path = cached_file(repo_id, (CONFIG_FILE,))
    if path is None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def cached_repos() -> list[str]:
    """Model repositories with at least one snapshot in the cache (``org/name``)."""
    root = cache_dir()
    if not root.is_dir():
        return []
    repos = []
    for entry in sorted(root.glob("models--*")):
        if (entry / "snapshots").is_dir() and any((entry / "snapshots").iterdir()):
            repos.append(entry.name[len("models--"):].replace("--", "/"))
    return repos


def _unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (None: a connection opens, or a proxy decides).

    huggingface_hub retries a failed connection five times with backoff (23 s in all,
    measured on a machine without a network) before it gives up; one connection attempt
    bounded by ETAG_TIMEOUT_S says the same at once.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None  # the proxy connects for us: let the download try
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=ETAG_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot connect to {url.hostname}:{port} ({exc.strerror or exc})"
    return None


def _not_found(what: str, repo_id: str, tried: list[str]) -> WeightsNotFoundError:
    lines = "\n".join(f"  - {line}" for line in tried)
    return WeightsNotFoundError(
        f"cannot find {what}; tried:\n{lines}",
        hint=(f"on a machine with internet run `HF_HOME=hf-cache hf download {repo_id}`, copy the folder "
              "hf-cache to this machine and set HF_HOME to it; or pass --weights FILE (a state dict for "
              "this architecture)"),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["CONFIG_FILE", "WEIGHT_FILES", "cache_dir", "cached_config", "cached_file", "cached_repos", "fetch", "offline",
           "read_config"]
