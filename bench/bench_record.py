"""What every small benchmark here records beside its figures: the machine line and the two result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from tofu_export.profiling.device import describe_device


def machine_line(load_before: float, *versions: str) -> str:
    """``"AMD EPYC, 2 cores, Python 3.11.7, torch 2.14.1, <versions>, load average 0.9 before"``."""
    device = describe_device()
    parts = [f"{device.cpu_model}, {device.cpu_cores} cores", f"Python {platform.python_version()}",
             f"torch {torch.__version__}", *versions, f"load average {load_before:.2f} before"]
    return ", ".join(parts)


def header(title: str, command: str, machine: str) -> list[str]:
    """The first lines of a result's Markdown: its title, the command that made it, the machine it ran on."""
    return [f"# {title}", "", f"Command: `{command}`", f"Machine: {machine}, {os.getloadavg()[0]:.2f} at the end.", ""]


def write_results(out: Path, stem: str, lines: list[str], record: dict) -> None:
    """``<out>/<stem>.md`` (``lines``) and ``<out>/<stem>.json`` (``record``), and the Markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    print("\n".join(lines))
