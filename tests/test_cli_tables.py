"""What the commands print: a table's title or caption wider than the table wraps at the terminal's width, not the
table's; titles, captions, notes and messages are printed literally (a path may hold ``[v2]``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from tofu_export.cli import app, output
from tofu_export.cli.output import print_line, print_table


def test_title_and_caption_wrap_at_the_terminal_not_at_the_table() -> None:
    title = "/a/folder/with/a/long/name/model.safetensors: mode tofu, r per block 16 x12, 224 px"
    caption = "GFLOPs 6.12 -> 3.72 (1.65x fewer); 65 tokens leave the last block."
    table = Table(title=title, caption=caption, title_justify="left", caption_justify="left")
    table.add_column("block")
    table.add_row("0")
    out = Console(width=100, record=True, color_system=None)
    print_table(out, table)
    lines = out.export_text().splitlines()
    assert lines[0] == title and lines[-1] == caption  # each on one line, around a table of 9 columns
    assert len(lines) == 2 + 5 and all(len(line) <= 9 for line in lines[1:-1])
    assert (table.title, table.caption) == (title, caption)  # the table itself is left as it was


def test_title_and_caption_are_taken_literally() -> None:
    """A path may hold square brackets; rich read ``[v2]`` as a style tag and dropped it, in a title, a caption or a
    cell (the export's architecture reason names the checkpoint's sidecar file)."""
    table = Table(title="/data/[v2]/model.pth: mode tofu", caption="from /data/[bold]/images", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("architecture", "6 heads from model[v2].json")
    out = Console(width=100, record=True, color_system=None)
    print_table(out, table)
    lines = out.export_text().splitlines()
    assert (lines[0], lines[-1]) == ("/data/[v2]/model.pth: mode tofu", "from /data/[bold]/images")
    assert "6 heads from model[v2].json" in lines[2]


def test_schedule_prints_the_checkpoint_path_whole(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``schedule``'s table is 40 columns wide; its title names the checkpoint, which rich used to cut at 40."""
    folder = tmp_path / "checkpoints_of_a_project_with_a_long_name"
    folder.mkdir()
    for path in (tiny_checkpoint, tiny_checkpoint.parent / "config.json"):
        shutil.copy(path, folder / path.name)
    checkpoint = folder / tiny_checkpoint.name
    result = CliRunner().invoke(app, ["schedule", str(checkpoint), "--r", "2"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert f"{checkpoint}: " in result.output
    assert "tokens leave the last block." in result.output


def test_lines_are_printed_literally_after_a_styled_label(monkeypatch) -> None:
    """Notes, "wrote ..." lines, warnings and errors name paths: rich read ``[v2]`` in them as a style and dropped
    it; the label before them keeps its style."""
    out = Console(width=100, record=True, color_system="truecolor")
    print_line(out, "report: /runs/[v2]/report.md")
    monkeypatch.setattr(output, "console", out)
    output.warn("nothing in /data/[bold]/images")
    assert out.export_text(clear=False).splitlines() == ["report: /runs/[v2]/report.md",
                                              "warning: nothing in /data/[bold]/images"]
    assert "\x1b[33mwarning:" in out.export_text(styles=True)  # the label is yellow; the message is plain
