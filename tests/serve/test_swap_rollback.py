"""The supervisor's side of a swap over several workers (serve/control.py), with real
worker processes and pipes: when a later worker refuses the new bundle (changed or
deleted while the swap ran), the workers already swapped are put back on the served
bundle and the caller gets the refusal, naming the worker.

A whole server cannot be made to fail on its second worker only on cue (both load the
same files), so each worker here runs the real ``serve_commands`` loop over a service
whose ``swap_to`` answers from a script: what the protocol does with the answers is
what is tested. tests/serve's swap tests cover a real server's swaps end to end.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from tagmill.errors import BundleError
from tagmill.serve.control import WorkerLink, serve_commands, swap_workers
from tagmill.serve.models import SwapOutcome

SERVED, NEW = "bundles/a", "bundles/b"


class _ScriptedService:
    """Worker ``index`` refuses ``NEW`` when it is in ``refusing``; every call is logged."""

    def __init__(self, index: int, refusing: tuple[int, ...], log) -> None:
        self.index, self.refusing, self.log = index, refusing, log
        self.location = SERVED

    def swap_to(self, location: str, *, allow_class_change: bool) -> SwapOutcome:
        # the queue's feeder thread may deliver after the reply: the time gives the call order
        # (CLOCK_MONOTONIC is one clock for every process)
        self.log.put((time.monotonic(), self.index, location))
        if location == NEW and self.index in self.refusing:
            raise BundleError(f"{location}: model.safetensors does not match its sha256")
        previous, self.location = self.location, location
        return SwapOutcome("swapped", f"v-{location}", f"v-{previous}", location)


def _worker(index: int, refusing: tuple[int, ...], commands, log) -> None:
    serve_commands(commands, _ScriptedService(index, refusing, log)).join()


@pytest.fixture
def workers(request):
    """Three worker processes; the test's parameter says which refuse the new bundle."""
    context = mp.get_context("fork")
    log = context.Queue()
    links = []
    for index in range(3):
        supervisor_end, worker_end = context.Pipe()
        process = context.Process(target=_worker, args=(index, request.param, worker_end, log), daemon=True)
        process.start()
        links.append(WorkerLink(process, requests=None, commands=supervisor_end))
    yield links, log
    for link in links:  # forked later workers hold copies of earlier pipes' ends: no EOF to wait for
        link.process.terminate()
        link.process.join(5)


def calls(log, count: int) -> list[tuple[int, str]]:
    """The workers' swap_to calls, (worker, location), in the order they were made."""
    seen = [log.get(timeout=10) for _ in range(count)]
    time.sleep(0.2)
    assert log.empty(), "more calls than expected"
    return [(index, location) for _, index, location in sorted(seen)]


@pytest.mark.parametrize("workers", [(2,)], indirect=True)
def test_a_later_worker_refusing_puts_back_the_workers_already_swapped(workers) -> None:
    links, log = workers
    with pytest.raises(BundleError) as refused:
        swap_workers(links, NEW, SERVED, allow_class_change=False)
    message = refused.value.message
    assert "sha256" in message and str(links[2].process.pid) in message and "2 worker(s) already swapped were put back" in message
    # one at a time: 0 and 1 swap, 2 refuses, then 0 and 1 go back to the served bundle
    assert calls(log, 5) == [(0, NEW), (1, NEW), (2, NEW), (0, SERVED), (1, SERVED)]


@pytest.mark.parametrize("workers", [(0,)], indirect=True)
def test_the_first_worker_refusing_is_the_check_and_nothing_changes(workers) -> None:
    links, log = workers
    with pytest.raises(BundleError) as refused:
        swap_workers(links, NEW, SERVED, allow_class_change=False)
    assert "put back" not in refused.value.message
    assert calls(log, 1) == [(0, NEW)]


@pytest.mark.parametrize("workers", [()], indirect=True)
def test_every_worker_swaps_when_none_refuses(workers) -> None:
    links, log = workers
    outcome = swap_workers(links, NEW, SERVED, allow_class_change=False)
    assert (outcome.status, outcome.version, outcome.previous_version, outcome.workers) == ("swapped", f"v-{NEW}", f"v-{SERVED}", 3)
    assert calls(log, 3) == [(0, NEW), (1, NEW), (2, NEW)]
