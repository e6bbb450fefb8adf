"""The capture writer: its own process, beside each server process that captures.

``serve/capture.py`` decides on the request path which images to keep and queues them;
a sender thread there hands this process one *part's* worth of items at a time over a
socket, and this process names them, packs the part (``formats/captures.py``'s layout),
writes it, and reports back what became of each item. Storing runs here, not in a
thread of the server, because it is Python work (the tar's headers, the JSON lines, and
into S3 the client's signing and HTTP on its own event loop): in the server it holds the
interpreter lock the threads answering requests need, and a bug or a memory blow-up in
it would take a worker down. Here the server process spends ~0.03 ms per captured image
(handing it over), and a writer that dies is replaced. The CPU storing takes (~0.4 ms
per 70 kB image) is the same in either place; bench/README.md ("Capture under load" and
after) has the measurements, including that moving it here did not measurably change
torch's throughput.

The process imports only what storing needs (no torch, no model): it starts in well
under a second and holds a few tens of MB. It ignores SIGINT (a terminal's Ctrl-C goes
to the whole process group; the server, not the writer, decides when to stop) and ends
when the server closes its end of the socket. The messages (:class:`Channel`) are plain
picklable values:

- to the writer: first its :class:`WriterConfig`, then ``(items, stop_by)`` — a part's
  items (:class:`Item`), and, once the server is stopping, the ``time.monotonic()`` after
  which nothing more is stored (the clock is the machine's, the same in both
  processes); the end of the stream (the server shuts its side) asks it to end, once
  it has stored what it was sent;
- back: a :class:`Report` after each part — captured and dropped counts by reason, the
  bytes written, and what to log (the server logs it: this process has no log handlers).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import secrets
import signal
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from tagmill import storage
from tagmill.formats import captures
from tagmill.formats.base import image_extension

#: why an item is dropped (the reason label of tagmill_capture_dropped_total)
QUEUE_FULL, CAP_REACHED, STORAGE_ERROR, INTERNAL_ERROR = "queue_full", "cap_reached", "storage_error", "error"
DROP_REASONS = (QUEUE_FULL, CAP_REACHED, STORAGE_ERROR, INTERNAL_ERROR)
#: a storage outage fails every write: log the first failure, then a count this often
LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class Item:
    """An image the server chose to keep, and what it answered for it."""

    data: bytes
    reason: str
    confidence: float
    at: float  #: time.time() when the request was answered
    version: str
    task: str
    classes: tuple[str, ...]  #: the same tuple for every item of a model: pickled once per part
    probabilities: list[float]
    labels: list[str]
    path: str | None
    content_type: str | None
    instance: int  #: the image's index in its request (JSON instances carry several)
    instances: int
    queued: float  #: time.monotonic() when it was queued: a part is due PART_S after its first item's


@dataclass(frozen=True)
class WriterConfig:
    location: str
    max_bytes: int  #: the cap, for every process capturing there together
    workers: int  #: processes capturing into the location at once, each taking an equal share
    server_pid: int  #: recorded with each image (which server process answered)
    storage_options: dict[str, Any] = field(default_factory=dict)  #: --storage-option, as the server has them


@dataclass
class Report:
    """What became of the items of the parts handled since the last report."""

    captured: Counter[str] = field(default_factory=Counter)  #: by reason
    dropped: Counter[str] = field(default_factory=Counter)  #: by drop reason
    bytes: int = 0
    logs: list[tuple[str, str]] = field(default_factory=list)  #: (level name, message)


@dataclass(frozen=True)
class _Taken:
    """An item in the part being filled: where and under which name it goes, what was served."""

    item: Item
    folder: str  #: the date folder of the part it starts, if it starts one
    stem: str  #: its name without extension; a part is named after its first item's
    image: str  #: its member name in the part
    line: bytes  #: its JSON line: what was served


class PartWriter:
    """Names, packs and writes parts; keeps within this process's share of the cap."""

    def __init__(self, config: WriterConfig) -> None:
        self.config = config
        self._token = secrets.token_hex(4)  # 32 random bits: names apart across workers and replicas
        self._sequence = 0
        self._budget: int | None = None  #: bytes this process may still write; None until scanned
        self._failures = 0  #: storage errors not yet logged
        self._logged_at = float("-inf")
        self.report = Report()

    def write(self, items: list[Item], stop_by: float | None = None) -> None:
        """Store ``items`` as one part (those the cap leaves room for); past ``stop_by``,
        store nothing more (what is left is abandoned, as a kill would)."""
        part = _Part()
        for item in items:
            if stop_by is not None and time.monotonic() > stop_by:
                return
            self._take(item, part)
        self._write_part(part.taken)

    def _take(self, item: Item, part: _Part) -> None:
        """Add an item to the part, if the cap leaves room for the part with it."""
        try:
            if self._budget is None:
                self._budget = self._scan()
            taken = self._entry(item)
            if part.size_with(taken) > self._budget:
                self.report.dropped[CAP_REACHED] += 1
                return
            part.add(taken)
        except Exception as exc:  # noqa: BLE001 - S3 down, disk full, no permission: count, log, go on
            self.report.dropped[STORAGE_ERROR] += 1
            self._log_failure(exc)

    def _write_part(self, part: list[_Taken]) -> None:
        """Write a part (into its first image's date folder); its items are counted as
        captured, or, on a storage error, as dropped."""
        if not part:
            return
        first = part[0]
        data = captures.pack_part([(t.image, t.item.data) for t in part], b"".join(t.line for t in part), first.item.at)
        try:
            _put(storage.join(first.folder, captures.part_name(first.stem, len(part))), data)
        except Exception as exc:  # noqa: BLE001 - as _take: never let the writer die
            self.report.dropped[STORAGE_ERROR] += len(part)
            self._log_failure(exc, len(part))
            return
        self._budget = (self._budget or 0) - len(data)
        self.report.captured.update(t.item.reason for t in part)
        self.report.bytes += len(data)

    def _scan(self) -> int:
        """What this process may write: its share of what the cap leaves. Also creates
        the folder and its marker. Raises StorageError/OSError when the target is unusable
        (the item is dropped and the scan is tried again with the next one)."""
        location = self.config.location
        storage.makedirs(location)
        fs, path = storage.filesystem(location)
        found = fs.find(path, detail=True)
        used = sum(int(info.get("size") or 0) for info in found.values())
        marker = storage.join(location, captures.MARKER)
        if not any(name.rstrip("/").endswith("/" + captures.MARKER) or name == captures.MARKER for name in found):
            storage.write_bytes(marker, json.dumps({"layout": captures.LAYOUT, "version": captures.LAYOUT_VERSION}).encode())
        budget = max(0, self.config.max_bytes - used) // self.config.workers
        self.report.logs.append(("INFO", f"capture: {location} holds {used / 1e6:.1f} MB; "
                                         f"this process may add {budget / 1e6:.1f} MB"))
        return budget

    def _entry(self, item: Item) -> _Taken:
        """Where an item goes, under which name, with which prediction line."""
        moment = datetime.fromtimestamp(item.at, tz=timezone.utc)
        self._sequence += 1
        stem = f"{moment:%Y%m%dT%H%M%S.%f}Z-{self._token}-{self._sequence:06d}"
        folder = storage.join(self.config.location, f"{moment:%Y-%m-%d}")
        image_name = stem + image_extension(item.data)
        record: dict[str, Any] = {
            "image": image_name,
            "captured_at": moment.isoformat().replace("+00:00", "Z"),
            "reason": item.reason,
            "confidence": round(item.confidence, 6),
            "model_version": item.version,
            "task": item.task,
            "classes": list(item.classes),
            "probabilities": np.round(np.asarray(item.probabilities, dtype=np.float64), 6).tolist(),  # 257 at once
            "labels": list(item.labels),
            "request": {"path": item.path, "content_type": item.content_type, "instance": item.instance,
                        "instances": item.instances, "bytes": len(item.data), "pid": self.config.server_pid},
        }
        return _Taken(item, folder, stem, image_name, json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def _log_failure(self, exc: BaseException, items: int = 1) -> None:
        self._failures += items
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self.report.logs.append(("ERROR", f"capture: cannot store into {self.config.location} "
                                              f"({self._failures} item(s) dropped since the last report): {exc}"))
            self._failures = 0
            self._logged_at = now

    def take_report(self) -> Report:
        report, self.report = self.report, Report()
        return report


@dataclass
class _Part:
    """The items of the part being filled, with its size kept as it grows (summed afresh
    for each item, filling a part was quadratic in its items)."""

    taken: list[_Taken] = field(default_factory=list)
    images: int = 0  #: the bytes of its image members, as the part holds them
    lines: int = 0  #: the bytes of its JSON lines (one member, the part's last)

    def size_with(self, taken: _Taken) -> int:
        """The part's bytes (``captures.part_size``) once ``taken`` is in it."""
        return (self.images + captures.member_size(len(taken.item.data))
                + captures.member_size(self.lines + len(taken.line)) + captures.END_BYTES)

    def add(self, taken: _Taken) -> None:
        self.taken.append(taken)
        self.images += captures.member_size(len(taken.item.data))
        self.lines += len(taken.line)


def _put(location: str, data: bytes) -> None:
    """Write a file atomically, without an fsync (a kill loses at most a second of a
    sample). On S3 one PUT is atomic already (an object appears whole or not at all)."""
    if storage.is_s3(location):
        fs, path = storage.filesystem(location)
        fs.pipe_file(path, data)
    else:
        storage.write_bytes(location, data, durable=False)


_LENGTH = struct.Struct("!Q")  #: what precedes each message: its length in bytes


class Channel:
    """Pickled messages over a stream socket, each after its length.

    Not multiprocessing's Connection: it reads a large message in pipe-sized chunks, each
    into freshly allocated memory (measured: ~0.19 ms of the reader's CPU per 70 kB
    image, as much as storing the image), where this reads every message into one buffer
    it keeps (as large as the largest part, PART_BYTES plus one image at most).

    One thread sends on each side (the server's sender thread; the writer's loop), and
    ending is a shutdown, not a message, so sends need no lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def send(self, message: object) -> None:
        """Send a message. OSError: the peer is gone (or this side ended sending)."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.sock.sendall(_LENGTH.pack(len(payload)))
        self.sock.sendall(payload)

    def end_sending(self) -> None:
        """No more messages from this side: the peer's recv() ends with EOFError once it has
        read what was sent; this side can still receive."""
        with contextlib.suppress(OSError):  # the peer is gone already
            self.sock.shutdown(socket.SHUT_WR)

    def recv(self) -> Any:
        """The next message. EOFError: the peer closed its end (or died)."""
        header = bytearray(_LENGTH.size)
        self._fill(memoryview(header))
        (size,) = _LENGTH.unpack(header)
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        view = memoryview(self._buffer)[:size]
        self._fill(view)
        return pickle.loads(view)

    def _fill(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            count = self.sock.recv_into(view[got:])
            if count == 0:
                raise EOFError("the other end closed the capture channel")
            got += count

    def close(self) -> None:
        self.sock.close()


def command(fd: int) -> list[str]:
    """The command line that starts a writer talking over socket ``fd`` (inherited); its
    first message is its :class:`WriterConfig` (not an argument: the storage options may
    hold credentials, and a command line is public to every user of the machine).

    A plain ``python -m``, not multiprocessing: its spawn re-imports the server's main
    module in the child, which is torch for a script that imports it, and the script
    again, unguarded, for one that builds the app at its top level."""
    return [sys.executable, "-m", __name__, str(fd)]


def main(sock: socket.socket) -> None:
    """The writer's loop: its configuration, then a part in and a report out, until the
    server says so or is gone."""
    channel = Channel(sock)
    try:
        config: WriterConfig = channel.recv()
    except (EOFError, OSError):
        channel.close()
        return
    storage.set_storage_options(config.storage_options)
    writer = PartWriter(config)
    try:
        while True:
            try:
                message = channel.recv()
            except (EOFError, OSError):
                return  # the server is gone
            items, stop_by = message
            writer.write(items, stop_by)
            channel.send(writer.take_report())
    except OSError:
        return  # the server went away while we reported
    finally:
        channel.close()


__all__ = ["DROP_REASONS", "Channel", "Item", "PartWriter", "Report", "WriterConfig", "command", "main"]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # see the module docstring
    # run the module's own copy, not this __main__ one: the reports it pickles must name
    # classes the server can import (tagmill.serve.capture_writer.Report)
    from tagmill.serve.capture_writer import main as run

    run(socket.socket(fileno=int(sys.argv[1])))
