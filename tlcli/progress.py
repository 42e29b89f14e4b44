"""Progress reporting, injected into the engine so that it never prints itself.

The engine calls `reporter.task(...)` and `reporter.info(...)`; the CLI passes
a `RichReporter`, tests use the silent `Reporter`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional


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
