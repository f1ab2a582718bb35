"""Where the toolchain writes: results to stdout, progress and messages to stderr.

Keeping progress bars and notes on stderr lets `mushcam-train evaluate --json` print nothing but JSON on
stdout. The consoles look up sys.stdout/sys.stderr at write time, so typer's CliRunner captures them.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """One line of progress information on stderr."""
    err.print(message, markup=False)


def warn(message: str) -> None:
    """A warning the user should read (stderr)."""
    err.print(f"warning: {message}", style="yellow", markup=False)


def track(items: Sequence[T] | Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (count, elapsed, remaining)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
