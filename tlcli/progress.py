"""Progress reporting, injected into the engine so that it never prints itself.

The engine calls `reporter.task(...)` and `reporter.info(...)`; the CLI passes
a `RichReporter` on a terminal, a `LineReporter` in logs (CI, pipes), and the
silent `Reporter` for `--quiet`; tests use the silent one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional, TextIO


class Task:
    def advance(self, n: int = 1, **fields) -> None:
        pass


class Reporter:
    """Silent: for tests and library use."""

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int], unit: str = "it") -> Iterator[Task]:
        yield Task()

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        """Something the user should know even with --quiet (a setting that is ignored)."""


class QuietReporter(Reporter):
    """--quiet: no progress and no information, but warnings still reach stderr."""

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)


class _RichTask(Task):
    def __init__(self, progress, task_id, unit: str):
        self.progress, self.task_id, self.unit = progress, task_id, unit

    def advance(self, n: int = 1, **fields) -> None:
        self.progress.update(self.task_id, advance=n, **fields)
        # rich's own speed is None until two updates have arrived: show it only then.
        speed = self.progress.tasks[self.task_id].speed
        if speed:
            self.progress.update(self.task_id, rate=f"{speed:7.1f} {self.unit}/s")


class RichReporter(Reporter):
    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int], unit: str = "it") -> Iterator[Task]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        ) as progress:
            task_id = progress.add_task(description, total=total, status="", rate="")
            yield _RichTask(progress, task_id, unit)

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {message}", highlight=False, markup=False)


class _LineTask(Task):
    """A few whole lines per task (at each quarter, and at the end), never cut to a width."""

    MILESTONES = (0.25, 0.5, 0.75)

    def __init__(self, description: str, total: Optional[int], unit: str, stream: TextIO):
        self.description, self.total, self.unit, self.stream = description, total, unit, stream
        self.done, self.status, self.started = 0, "", time.perf_counter()
        self.next_milestone = 0

    def advance(self, n: int = 1, **fields) -> None:
        self.done += n
        self.status = fields.get("status", self.status)
        if not self.total:
            return
        crossed = False
        while self.next_milestone < len(self.MILESTONES) and self.done >= self.MILESTONES[self.next_milestone] * self.total:
            self.next_milestone += 1
            crossed = True
        if crossed and self.done < self.total:  # one line, however many quarters one step crossed
            self.line()

    def line(self) -> None:
        elapsed = time.perf_counter() - self.started
        of = f"/{self.total}" if self.total else ""
        rate = f"  {self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 and self.done else ""
        status = f"  {self.status}" if self.status else ""
        print(f"{self.description}: {self.done}{of} {self.unit}{rate}  {elapsed:.1f}s{status}", file=self.stream, flush=True)


class LineReporter(Reporter):
    """For logs without a terminal: plain lines on stderr."""

    def __init__(self, stream: Optional[TextIO] = None):
        # sys.stderr is looked up at use, not at import: test runners and CLIs swap it.
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int], unit: str = "it") -> Iterator[Task]:
        task = _LineTask(description, total, unit, self.stream)
        yield task
        task.line()

    def info(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=self.stream, flush=True)


class RankReporter(LineReporter):
    """A rank other than 0 under torchrun: its messages, tagged with the rank; no progress bars
    (rank 0 draws those, for the whole run)."""

    def __init__(self, tag: str, stream: Optional[TextIO] = None):
        super().__init__(stream)
        self.tag = tag

    @contextlib.contextmanager
    def task(self, description: str, total: Optional[int], unit: str = "it") -> Iterator[Task]:
        yield Task()

    def info(self, message: str) -> None:
        super().info(message if message.startswith(self.tag) else f"{self.tag}: {message}")

    def warn(self, message: str) -> None:
        """Rank 0 tells the run's warnings, once."""
