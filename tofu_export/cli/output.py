"""What the commands print: progress on stderr, results on stdout (tables, or JSON with ``--json``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


@contextmanager
def steps(enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner that shows the current stage of a long job; yields ``step(name)``. Each step also prints one line
    with the time since the job started (``- [0:42] exporting to ONNX``), so a log shows where the time went."""
    columns = (SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn())
    started = time.monotonic()
    with Progress(*columns, console=console, transient=True, disable=not enabled) as progress:
        task = progress.add_task("starting")

        def step(name: str) -> None:
            progress.update(task, description=name)
            minutes, seconds = divmod(int(time.monotonic() - started), 60)
            print_line(console, name, label=f"[dim]- \\[{minutes}:{seconds:02d}][/] ")

        yield step


def print_line(out: Console, text: str, label: str = "") -> None:
    """One line of plain text, taken literally (a path may hold ``[v2]``, which rich would read as markup and drop),
    wrapped by the terminal; ``label``: a styled prefix in rich markup (``"[yellow]warning:[/] "``)."""
    if label:
        out.print(label, end="", highlight=False)
    out.print(text, highlight=False, soft_wrap=True, markup=False)


def print_table(out: Console, table: Table) -> None:
    """Print ``table`` with its title above and its caption below as lines of their own, wrapped to the terminal's
    width, and every text in it taken literally: rich wraps a title to the table's width, which cut a path in a
    narrow table's title mid-name (``.../dinov2_vits14_img_focu`` / ``s/vit_small...``), and reads ``[...]`` as
    markup, which dropped ``[v2]`` from ``/data/[v2]/model.pth`` (no table of this tool styles its cells)."""
    title, caption = table.title, table.caption
    table.title = table.caption = None
    try:
        if title:
            out.print(title, style="table.title", highlight=False, markup=False)
        out.print(table, markup=False)
        if caption:
            out.print(caption, style="table.caption", highlight=False, markup=False)
    finally:
        table.title, table.caption = title, caption


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def warn(message: str) -> None:
    print_line(console, message, label="[yellow]warning:[/] ")


@contextmanager
def library_warnings() -> Iterator[list[str]]:
    """Collect the warnings raised inside (torch, onnx, timm...) instead of letting their raw text and source paths
    reach the terminal; yields the list their first lines are added to (distinct, in order)."""
    import warnings

    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            for w in caught:
                line = str(w.message).strip().splitlines()[0] if str(w.message).strip() else type(w.message).__name__
                if line not in messages:
                    messages.append(line)


def warnings_note(messages: list[str]) -> str | None:
    """One ``note:`` line for the library warnings of a command (None when there were none)."""
    if not messages:
        return None
    first = messages[0] if len(messages[0]) <= 160 else messages[0][:157] + "..."
    more = f" (and {len(messages) - 1} more)" if len(messages) > 1 else ""
    return f"note: {len(messages)} library warning{'s' if len(messages) > 1 else ''} while running, e.g. {first}{more}"
