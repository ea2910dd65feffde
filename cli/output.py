"""Printing: JSON documents on stdout for scripts, readable text otherwise, progress on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def human_size(n: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB): the one formatter of progress bars and summaries."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextmanager
def transfer_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr (only on a terminal); yields the callback or None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    tasks: dict[str, Any] = {}
    with Progress(*transfer_columns(), console=Console(stderr=True), transient=False) as bar:

        def advance(label: str, n: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.advance(tasks[label], n)

        yield advance


def transfer_columns() -> list[Any]:
    """Columns of a transfer bar: label, bar, done/total and speed, sizes through ``human_size``
    (rich's own download columns count in decimal MB)."""
    from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
    from rich.text import Text

    class Size(ProgressColumn):
        def render(self, task: Task) -> Text:
            done = human_size(task.completed)
            return Text(done if task.total is None else f"{done}/{human_size(task.total)}", style="progress.download")

    class Speed(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else f"{human_size(speed)}/s", style="progress.data.speed")

    return [TextColumn("{task.description}"), BarColumn(), Size(), Speed()]


def warn(message: str) -> None:
    click.secho(message, fg="yellow", err=True)
