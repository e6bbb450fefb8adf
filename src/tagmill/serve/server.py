"""Run the app under uvicorn: one process, or several workers sharing one port.

    python -m tagmill.serve BUNDLE [--port 8080] [--workers 2] ...

(``tagmill serve`` is the same with the CLI's conventions.)

Several workers (``--workers N``): each process binds its own SO_REUSEPORT socket
and the kernel spreads connections over them (``workers.py``; uvicorn's shared socket
lets one worker take a whole burst of keep-alive connections). Where SO_REUSEPORT
does not exist, uvicorn's own ``--workers`` supervisor is used.

TCP_NODELAY: asyncio turns Nagle's algorithm off only for sockets whose ``proto`` is
IPPROTO_TCP. uvicorn's ``--workers`` binds its socket as ``socket.socket(AF_INET)``
(proto 0), so accepted connections keep Nagle on: the response body, written after
the headers, waits for the client's delayed ACK and every keep-alive response takes
~40 ms. :class:`NoDelayHTTPProtocol` sets TCP_NODELAY on every
accepted connection, whatever created the socket (and ``workers.bind`` creates its
sockets with IPPROTO_TCP as well).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import typing
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tagmill.errors import TagmillError
from tagmill.serve.config import ServeConfig
from tagmill.serve.errors import TooManyConnectionsError
from tagmill.serve.metrics import MULTIPROC_ENV
from tagmill.serve.models import check_bundle
from tagmill.serve.workers import bind, reuseport_supported, run_workers

# The model stack (torch, timm, onnxruntime, the app) is imported only where a process
# serves or checks the model: a supervisor of several workers never holds it (it held
# ~740 MB of RSS for nothing).
if TYPE_CHECKING:
    from fastapi import FastAPI

#: How the parent process hands the config to worker processes it spawns.
CONFIG_ENV = "TAGMILL_SERVE_CONFIG"


#: How the parent hands the header timeout to the protocol objects uvicorn builds itself.
HEADER_TIMEOUT_ENV = "TAGMILL_HEADER_TIMEOUT_S"


class NoDelayHTTPProtocol(HttpToolsProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol, with TCP_NODELAY on each accepted connection, and a
    deadline for a request's line and headers.

    uvicorn times out idle keep-alive connections only after a response; a client that
    connects and sends half a request line (slow loris) would hold its connection and
    file descriptor forever. The deadline runs from the connection, and again from each
    response, until the next request's headers are complete.
    """

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # the peer may already be gone
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        seconds = float(os.environ.get(HEADER_TIMEOUT_ENV, ServeConfig.header_timeout_s))
        self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        busy = (self.cycle is not None and not self.cycle.response_complete) or self.pipeline
        if not busy and not self.transport.is_closing():  # a request being answered has its headers
            self.transport.close()


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """The answer past ``--max-connections``: tagmill's JSON error, not uvicorn's text."""
    error = TooManyConnectionsError(
        "the server is busy: this worker has as many open connections as --max-connections allows",
        hint="retry after a second, or close idle keep-alive connections",
    )
    from tagmill.serve.app import error_response  # in a worker: already imported

    response = error_response(error.http_status, type(error).__name__, error.message, error.hint,
                              headers={"Retry-After": str(error.retry_after_s), "Connection": "close"})
    await response(scope, receive, send)


# uvicorn answers requests past limit_concurrency with this module-level ASGI app (it
# offers no option for it); tagmill's clients parse one error format
httptools_impl.service_unavailable = _too_many_connections


def app_from_env() -> FastAPI:
    """The app factory each worker process calls (uvicorn ``factory=True``)."""
    from tagmill.serve.app import create_app

    return create_app(ServeConfig.from_json(os.environ[CONFIG_ENV]), exit_on_load_error=True)


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    return {
        "host": config.host,
        "port": config.port,
        # a string, imported by each worker: the supervisor's 5-second health check
        # starts only after a worker has unpickled its config, and a class here would
        # make that import torch first
        "http": "tagmill.serve.server:NoDelayHTTPProtocol",
        # a worker busy importing torch or running the model answers pings late; do not
        # let the supervisor kill and respawn it for that
        "timeout_worker_healthcheck": 60,
        "log_level": config.log_level,
        "access_log": config.access_log,
        "lifespan": "on",
        "server_header": False,
        "limit_concurrency": config.max_connections,
    }


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _check_in_child(config_json: str, errors: mp.Queue) -> None:
    try:
        check_bundle(ServeConfig.from_json(config_json))
        errors.put(None)
    except TagmillError as exc:
        errors.put(exc)  # TagmillError pickles with its hint and class (exit code)


def check_bundle_elsewhere(config: ServeConfig) -> None:
    """:func:`check_bundle` in a short-lived process, so that the caller never imports
    the model stack nor reads the weights (a supervisor of several workers)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    child = ctx.Process(target=_check_in_child, args=(config.to_json(), errors))
    child.start()
    try:
        while True:  # no deadline: a bundle on S3 may take a while to read
            try:
                found = errors.get(timeout=0.5)
            except queue.Empty:
                if child.is_alive():
                    continue
                try:  # an answer sent just before it ended
                    found = errors.get(timeout=1.0)
                except queue.Empty:
                    raise TagmillError(f"checking the bundle crashed (exit code {child.exitcode})") from None
            if found is not None:
                raise found
            return
    finally:
        child.join()


def run_server(config: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM). SIGHUP reads the bundle's location
    again and swaps to what it holds now, if that is another version."""
    if config.workers == 1:
        check_bundle(config)  # this process is the worker: it loads the stack anyway
    else:
        check_bundle_elsewhere(config)
    os.environ[HEADER_TIMEOUT_ENV] = str(config.header_timeout_s)  # workers inherit it
    options = uvicorn_options(config)
    if config.workers == 1:
        with bind(config.host, config.port, shared=False):
            pass  # a taken port fails now, clearly, not after the model has loaded
        # uvicorn shuts down gracefully on SIGTERM and then raises the signal again for
        # the handler it found: with the default one the process would die with 143, as
        # if killed. A stop request that was honoured is a clean exit (0).
        previous = signal.signal(signal.SIGTERM, _exit_cleanly)
        try:
            from tagmill.serve.app import create_app

            uvicorn.run(create_app(config, exit_on_load_error=True, reload_on_sighup=True), **options)
        finally:
            signal.signal(signal.SIGTERM, previous)
        return
    with multiprocess_metrics_dir():
        if reuseport_supported():
            run_workers(config, options)  # one socket per worker: the kernel balances connections
            return
        # elsewhere, uvicorn's own workers: an import string + factory, each builds its app
        os.environ[CONFIG_ENV] = config.to_json()
        uvicorn.run("tagmill.serve.server:app_from_env", factory=True, workers=config.workers, **options)


@contextlib.contextmanager
def multiprocess_metrics_dir() -> Iterator[str]:
    """A fresh PROMETHEUS_MULTIPROC_DIR for the workers (a user's own is kept as is)."""
    existing = os.environ.get(MULTIPROC_ENV)
    if existing:
        os.makedirs(existing, exist_ok=True)
        yield existing
        return
    path = tempfile.mkdtemp(prefix="tagmill-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


# --- python -m tagmill.serve ---------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """One option per ServeConfig field (``max_batch`` → ``--max-batch``)."""
    parser = argparse.ArgumentParser(prog="python -m tagmill.serve", description="Serve a tagmill bundle.")
    parser.add_argument("bundle")
    hints = typing.get_type_hints(ServeConfig)
    for spec in fields(ServeConfig):
        if spec.name == "bundle":
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = spec.default if spec.default is not MISSING else None
        # `int | None` → int: None is the default, never typed on a command line
        kind = next((t for t in typing.get_args(hints[spec.name]) if t is not type(None)), hints[spec.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            convert = next((t for t in (int, float) if kind is t), str)
            parser.add_argument(flag, type=convert, default=default)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        run_server(ServeConfig(**args))
    except TagmillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
