"""Model swaps in a server of several worker processes.

Any worker can be asked to swap (``POST /admin/model`` lands on whichever worker the
kernel gave the connection), and the supervisor can be (SIGHUP), but every worker must
end up on the new model. So a swap is always run by the supervisor, over two pipes per
worker:

* **requests** — the worker asks (``("swap", location, allow_class_change)``), the
  supervisor answers when every worker is done;
* **commands** — the supervisor tells one worker to swap, the worker answers
  with its :class:`~tagmill.serve.models.SwapOutcome` or its error.

The supervisor swaps the workers **one at a time**, each in place (the process, its
socket and its connections stay; its model is loaded beside the old one, checked, then
swapped, and its in-flight requests finish on the old one), so at most one worker holds
two models at once and the others keep answering at full speed meanwhile. The first
worker to load the bundle is its check: if it refuses the bundle, no worker changed
and the caller gets that worker's error. Should a later worker fail (a bundle changed
or deleted while the swap ran), the workers already swapped are put back on the
previous bundle, so the server never answers with two versions for longer than a swap.
A worker started later (one that died is replaced) starts on the bundle last swapped in.

Nothing here imports the model stack: the supervisor runs it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from tagmill.errors import TagmillError
from tagmill.serve.errors import NotReadyError
from tagmill.serve.models import SwapOutcome

if TYPE_CHECKING:
    from tagmill.serve.service import Service

log = logging.getLogger("uvicorn.error")

SWAP = "swap"
OK, ERROR = "ok", "error"
#: how often a wait for a worker's answer checks that the worker is still alive
POLL_S = 0.5

#: what the admin route and SIGHUP call: (location or None for the served one's,
#: allow_class_change) -> outcome; blocking
SwapFunction = Callable[[str | None, bool], SwapOutcome]


@dataclass
class WorkerLink:
    """The supervisor's ends of one worker's pipes."""

    process: BaseProcess
    requests: Connection  #: the worker asks for a swap; the supervisor answers
    commands: Connection  #: the supervisor tells the worker to swap; the worker answers


# --- the worker's side ----------------------------------------------------------------


class SupervisorSwap:
    """A worker's swap function: ask the supervisor, which swaps every worker."""

    def __init__(self, requests: Connection) -> None:
        self._requests = requests
        self._lock = threading.Lock()  # one question on the pipe at a time

    def __call__(self, location: str | None, allow_class_change: bool) -> SwapOutcome:
        with self._lock:
            try:
                self._requests.send((SWAP, location, allow_class_change))
                status, value = self._requests.recv()
            except (EOFError, OSError):
                raise NotReadyError("the server is shutting down") from None
        if status == ERROR:
            raise value
        return SwapOutcome(**value)


def serve_commands(commands: Connection, service: Service) -> threading.Thread:
    """Start a thread of a worker that swaps its model when the supervisor says so."""

    def run() -> None:
        while True:
            try:
                _, location, allow_class_change = commands.recv()
            except (EOFError, OSError):
                return  # the supervisor is gone: the worker is being stopped
            try:
                reply: tuple[str, Any] = (OK, service.swap_to(location, allow_class_change=allow_class_change).as_dict())
            except TagmillError as exc:
                reply = (ERROR, exc)
            except Exception as exc:  # a bug, not the bundle: reported, and the worker serves on
                log.exception("swapping the model failed")
                reply = (ERROR, TagmillError(f"swapping the model failed ({type(exc).__name__}); see the server log"))
            try:
                commands.send(reply)
            except OSError:
                return

    thread = threading.Thread(target=run, name="tagmill-swap", daemon=True)
    thread.start()
    return thread


# --- the supervisor's side --------------------------------------------------------------


def swap_workers(links: list[WorkerLink], location: str, served_location: str, *,
                 allow_class_change: bool) -> SwapOutcome:
    """Swap every worker to the bundle at ``location``, one at a time; raises the first
    refusal (a TagmillError) after putting back the workers already swapped."""
    done: list[tuple[WorkerLink, SwapOutcome]] = []
    for link in links:
        try:
            outcome = _ask(link, location, allow_class_change)
        except TagmillError as exc:
            if done and location != served_location:
                _put_back([d for d, o in done if o.status == "swapped"], served_location)
                exc.message += f" (worker {link.process.pid}; the {len(done)} worker(s) already swapped were put back)"
            raise
        if outcome is not None:  # None: the worker died meanwhile; its replacement starts on the new bundle
            done.append((link, outcome))
    if not done:
        raise NotReadyError("no worker is running; the server is restarting them")
    first = done[0][1]
    swapped = any(o.status == "swapped" for _, o in done)
    version = done[-1][1].version
    return SwapOutcome("swapped" if swapped else "unchanged", version, first.previous_version, location,
                       workers=sum(o.version == version for _, o in done))


def _ask(link: WorkerLink, location: str, allow_class_change: bool) -> SwapOutcome | None:
    """One worker's swap; None when the worker is not alive to answer."""
    try:
        link.commands.send((SWAP, location, allow_class_change))
        while not link.commands.poll(POLL_S):  # no deadline: a bundle on S3 may take a while
            if not link.process.is_alive():
                return None
        status, value = link.commands.recv()
    except (EOFError, OSError):
        return None
    if status == ERROR:
        raise value
    return SwapOutcome(**value)


def _put_back(links: list[WorkerLink], location: str) -> None:
    for link in links:
        try:
            _ask(link, location, True)
        except TagmillError as exc:  # the old bundle, loaded minutes ago, fails now: say so
            log.error("worker %s could not go back to %s: %s", link.process.pid, location, exc)


__all__ = ["SupervisorSwap", "SwapFunction", "WorkerLink", "serve_commands", "swap_workers"]
