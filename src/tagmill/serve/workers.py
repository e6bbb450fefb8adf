"""Several server processes on one port, with the kernel balancing connections.

uvicorn's ``--workers`` shares one listening socket between its processes. asyncio
accepts every pending connection at once, so the worker that wakes first takes a
whole burst: measured here, 8 keep-alive clients connecting together landed 7 on
one worker and 1 on the other, and 32 landed 32 to 0, leaving half the CPUs idle
for as long as those connections live (a load balancer's pool lives for hours).

Here every worker binds its own socket with SO_REUSEPORT and Linux hashes each new
connection to one of them, so connections spread evenly. A worker starts listening
only when its model is loaded, so no connection lands on one that would answer 503.
The parent binds the port first (failing clearly if it is taken, and resolving port
0), keeps that bound but never-listening socket as a placeholder, starts the workers,
restarts one that dies, and stops them all on SIGINT / SIGTERM. It also runs model
swaps, asked by a worker's admin route or by SIGHUP (``control.py``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
from dataclasses import replace
from typing import Any

from tagmill.errors import InputError, TagmillError
from tagmill.serve.config import STARTUP_FAILURE, ServeConfig
from tagmill.serve.control import SWAP, WorkerLink, swap_workers
from tagmill.serve.metrics import MULTIPROC_ENV

log = logging.getLogger("uvicorn.error")


def reuseport_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def bind(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A TCP socket bound to host:port (with SO_REUSEPORT when ``shared``), not listening.

    proto=IPPROTO_TCP also lets asyncio turn on TCP_NODELAY for accepted connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                         hint="is another server running there? choose another --port") from exc
    return sock


def run_workers(config: ServeConfig, options: dict[str, Any]) -> None:
    """Serve with ``config.workers`` processes until SIGINT / SIGTERM."""
    _configure_logging(options["log_level"])
    # First bind without SO_REUSEPORT: that fails if anything listens there already,
    # another tagmill server included, which would otherwise share the port silently.
    with bind(config.host, config.port, shared=False) as probe:
        port = probe.getsockname()[1]  # port 0: the one the kernel chose
    placeholder = bind(config.host, port)
    config = replace(config, port=port)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited
    stop, reload = threading.Event(), threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload.set())

    def start() -> WorkerLink:
        # the worker's ends travel to it; the supervisor closes its copies, so that a
        # worker that dies reads as end-of-file on the supervisor's ends
        requests, worker_requests = ctx.Pipe()
        commands, worker_commands = ctx.Pipe()
        # config is read when the worker starts: a replacement starts on the bundle last swapped in
        process = ctx.Process(target=_worker_main, args=(config.to_json(), options, worker_requests, worker_commands),
                              daemon=False)
        process.start()
        worker_requests.close()
        worker_commands.close()
        return WorkerLink(process, requests, commands)

    def swap(location: str | None, allow_class_change: bool) -> Any:
        nonlocal config
        try:
            outcome = swap_workers(workers, location or config.bundle, config.bundle,
                                   allow_class_change=allow_class_change)
        except TagmillError as exc:
            log.error("model swap refused: %s", exc)
            return exc
        config = replace(config, bundle=outcome.bundle)
        log.info("model %s: version %s on %d workers (%s)", outcome.status, outcome.version, outcome.workers,
                 outcome.bundle)
        return outcome

    workers = [start() for _ in range(config.workers)]
    log.info("tagmill: %d workers serving on http://%s:%d", config.workers, config.host, config.port)
    failed = False
    try:
        while not stop.is_set() and not failed:
            # a swap runs here, between checks for dead workers: a worker that dies
            # meanwhile is replaced right after it, on the bundle it swapped to
            asked = mp.connection.wait([link.requests for link in workers], timeout=0.5)
            for conn in asked:
                _answer_swap_request(conn, swap)  # type: ignore[arg-type]
            if reload.is_set():
                reload.clear()
                log.info("SIGHUP: reading %s again", config.bundle)
                swap(None, False)
            for index, link in enumerate(workers):
                process = link.process
                if process.is_alive():
                    continue
                _forget_metrics_of(process.pid)
                link.requests.close()
                link.commands.close()
                if process.exitcode == STARTUP_FAILURE:  # not worth restarting: it would fail again
                    failed = True
                    break
                log.warning("worker %s died (exit code %s); starting another", process.pid, process.exitcode)
                workers[index] = start()
    finally:
        _stop_all([link.process for link in workers])
        placeholder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise TagmillError("a server worker could not start; its error is printed above")


def _answer_swap_request(conn: mp.connection.Connection, swap: Any) -> None:
    """Run the swap a worker asked for and send it the outcome (or the refusal)."""
    try:
        kind, location, allow_class_change = conn.recv()
    except (EOFError, OSError):
        return  # the worker died; the loop replaces it
    if kind != SWAP:
        return
    result = swap(location, allow_class_change)
    reply = ("error", result) if isinstance(result, TagmillError) else ("ok", result.as_dict())
    try:
        conn.send(reply)
    except OSError:
        pass  # the worker that asked is gone; the swap stands


def _forget_metrics_of(pid: int | None) -> None:
    """Drop a dead worker's live gauges (queue depth) from the shared metrics."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _configure_logging(level: str) -> None:
    """The parent logs like its uvicorn workers do."""
    import logging.config

    import uvicorn.config

    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
    log.setLevel(uvicorn.config.LOG_LEVELS[level])


def _stop_all(workers: list[mp.process.BaseProcess], timeout: float = 30.0) -> None:
    for process in workers:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)  # uvicorn finishes the requests in flight
    for process in workers:
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()


def _worker_main(config_json: str, options: dict[str, Any], requests: mp.connection.Connection,
                 commands: mp.connection.Connection) -> None:
    import sys

    import uvicorn

    from tagmill.serve.app import create_app
    from tagmill.serve.control import SupervisorSwap, serve_commands

    # a hangup of the terminal's process group reaches the workers too: only the
    # supervisor acts on it (it swaps every worker)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = ServeConfig.from_json(config_json)
    try:
        sock = bind(config.host, config.port)
        # listen only once the model is loaded: the kernel then hands connections to
        # the workers that can answer them, at startup and while a dead one is replaced
        app = create_app(config, exit_on_load_error=True, start_when_loaded=True, swap=SupervisorSwap(requests))
    except Exception as exc:  # reported once, then the parent stops (no restart loop)
        print(f"tagmill worker: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    serve_commands(commands, app.state.service)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    server.run(sockets=[sock])

