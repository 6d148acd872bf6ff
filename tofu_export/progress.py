"""Progress that reaches logs too: a rich bar on a terminal; elsewhere (stderr redirected to a file, CI) one line
every few seconds with what is running, done/total, elapsed time and an ETA from the pace so far."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TextIO


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3m05s``, ``1h02m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress(Protocol):
    """What ``tracker`` yields, a log or a bar: name the current unit, count units, begin the next stage, resize
    this one."""

    def status(self, text: str) -> None: ...

    def advance(self, units: int = 1) -> None: ...

    def stage(self, label: str, total: int) -> None: ...

    def resize(self, total: int) -> None: ...


class ProgressLog:
    """Counts ``done`` of ``total`` units of work and writes a line at most every ``every_s`` seconds (and at the end).

    ``stream``: where the lines go (stderr); ``clock``: for tests. Use ``status(text)`` to name the current unit and
    ``stage(label, total)`` to begin the next stage of a job of several, ``resize(total)`` where a stage's total
    becomes known as it runs; ``total`` 0: not known in advance.
    """

    def __init__(self, label: str, total: int, *, every_s: float = 5.0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.every_s = label, max(total, 0), every_s
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.started = self.last = clock()
        self.done = 0
        self.current = ""
        self.written: tuple[str, int] | None = None  # (label, done) of the last line written

    def status(self, text: str) -> None:
        self.current = text
        self._maybe_write()

    def advance(self, units: int = 1) -> None:
        self.done += units
        self._maybe_write(force=0 < self.total <= self.done)

    def stage(self, label: str, total: int) -> None:
        """Begin the next stage: its label, ``total`` units counted from 0 and timed from now; says so at once."""
        self.label, self.total, self.done, self.current = label, max(total, 0), 0, ""
        self.started = self.clock()
        self._maybe_write(force=True)

    def resize(self, total: int) -> None:
        """This stage's ``total``, once it is known better than when the stage began (what is done stays)."""
        self.total = max(total, 0)

    def finish(self) -> None:
        """Write the last count if no line has said it yet (a stage of unknown length ends without a forced line)."""
        if self.written is not None and self.written != (self.label, self.done):
            self._maybe_write(force=True)

    def line(self) -> str:
        """``sweep: 3/9 (tofu r=8), 1m10s elapsed, ETA 2m20s`` (``3 done`` where the total is not known)"""
        elapsed = self.clock() - self.started
        known = self.total > 0
        eta = f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}" if known and self.done else ""
        now = f" ({self.current})" if self.current else ""
        count = f"{self.done}/{self.total}" if known else f"{self.done} done"
        return f"{self.label}: {count}{now}, {format_seconds(elapsed)} elapsed{eta}"

    def _maybe_write(self, force: bool = False) -> None:
        now = self.clock()
        if force or now - self.last >= self.every_s:
            self.last, self.written = now, (self.label, self.done)
            print(self.line(), file=self.stream, flush=True)


class _Bar:
    """The same interface over a rich progress bar (a terminal)."""

    def __init__(self, progress: object, task: object) -> None:
        self.progress, self.task = progress, task

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)  # type: ignore[attr-defined]

    def advance(self, units: int = 1) -> None:
        self.progress.advance(self.task, units)  # type: ignore[attr-defined]

    def stage(self, label: str, total: int) -> None:
        self.progress.reset(self.task, total=total or None, description=label)  # type: ignore[attr-defined]

    def resize(self, total: int) -> None:
        self.progress.update(self.task, total=total or None)  # type: ignore[attr-defined]


@contextmanager
def tracker(label: str, total: int, enabled: bool = True, every_s: float = 5.0,
            announce: bool = False) -> Iterator[Progress]:
    """Progress of ``total`` units (0: not known in advance): a rich bar when stderr is a terminal, ``ProgressLog``
    lines otherwise, nothing when not ``enabled``; either is a ``Progress``. ``announce``: a log gets its first line
    at once, not after the first unit (which may take minutes); a bar shows from the start anyway."""
    if enabled and sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        description = TextColumn("{task.description}", markup=False)  # a path may hold "[v2]": not markup
        columns = (description, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with RichProgress(*columns, console=Console(stderr=True)) as progress:
            yield _Bar(progress, progress.add_task(label, total=total or None))
        return
    log = ProgressLog(label, total, every_s=every_s, stream=None if enabled else _Null())
    if announce:
        log.stage(label, total)
    yield log
    log.finish()


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        return None
