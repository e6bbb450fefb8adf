"""Progress reporting that the library can call and the CLI can render.

Library code takes a :class:`Progress` and calls ``progress.task(...)``; it never
prints. The CLI passes :class:`RichProgress` (bars on stderr); tests and library users
get :data:`SILENT`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as _RichProgress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

#: ``advance(n, info)``: n more items done; ``info`` (optional) replaces the bar's
#: status text, e.g. the running loss.
Advance = Callable[..., None]


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Advance]: ...


class SilentProgress:
    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1, info=None: None


SILENT = SilentProgress()


class _RateColumn(ProgressColumn):
    """Items per second ("412/s"), blank until rich has a speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "", style="progress.data.speed")


class RichProgress:
    """One rich progress bar per task, on the given console (stderr by default)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Advance]:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with _RichProgress(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str | None = None) -> None:
                if info is None:
                    bar.advance(task_id, n)
                else:
                    bar.update(task_id, advance=n, info=info)

            yield advance
