"""Jetson power, RAM and GPU load from ``tegrastats``, sampled in a background thread while profiling.

Line formats handled (one sample per line, fields in any order):

* JetPack 4 (Nano, TX2): ``RAM 1512/3956MB ... GR3D_FREQ 0%@76 ... POM_5V_IN 1221/1221 POM_5V_GPU 0/0``
* JetPack 5 (Xavier, Orin): ``RAM 3000/15388MB ... GR3D_FREQ 0%@[305,305] ... VDD_IN 5015mW/5015mW ...``
* JetPack 6 (Orin): ``11-15-2024 10:30:45 RAM 2296/7620MB ... GR3D_FREQ 12% ... VDD_IN 4395mW/4395mW ...``

Power rails are ``current/average`` in mW; the instantaneous (first) value of the board-input rail is used.
Nothing is ever estimated: where tegrastats is absent or a field is missing, the value is ``None``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

INPUT_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")  # whole-board input power, by JetPack generation
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_RAIL = re.compile(r"\b(" + "|".join(INPUT_RAILS) + r") (\d+)(?:mW)?/(\d+)(?:mW)?")


@dataclass(frozen=True)
class TegraSample:
    """One tegrastats line: RAM in MiB, GPU (GR3D) load in %, board input power in mW and its rail name."""

    ram_used_mib: int | None
    ram_total_mib: int | None
    gr3d_pct: int | None
    power_mw: int | None
    power_rail: str | None


def parse_line(line: str) -> TegraSample | None:
    """Parse one tegrastats line; ``None`` if it carries none of the known fields."""
    ram, gr3d, rail = _RAM.search(line), _GR3D.search(line), _RAIL.search(line)
    if ram is None and gr3d is None and rail is None:
        return None
    return TegraSample(
        ram_used_mib=int(ram.group(1)) if ram else None,
        ram_total_mib=int(ram.group(2)) if ram else None,
        gr3d_pct=int(gr3d.group(1)) if gr3d else None,
        power_mw=int(rail.group(2)) if rail else None,
        power_rail=rail.group(1) if rail else None,
    )


@dataclass(frozen=True)
class PowerReport:
    """Averages over the samples taken while profiling; ``available=False`` with ``reason`` off-Jetson.

    ``energy_mj_per_image`` = mean board power (W) x timed seconds / images, in mJ; it includes idle power.
    """

    available: bool
    reason: str | None
    n_samples: int = 0
    power_rail: str | None = None
    mean_power_mw: float | None = None
    energy_mj_per_image: float | None = None
    gr3d_mean_pct: float | None = None
    ram_used_max_mib: int | None = None
    ram_total_mib: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_samples(samples: Sequence[TegraSample], *, total_time_s: float, images: int) -> PowerReport:
    """Mean power, energy per image, mean GPU load and peak RAM over ``samples``."""
    if not samples:
        return PowerReport(False, "tegrastats gave no samples during the run; use a shorter tegrastats_interval_ms")
    powers = [s.power_mw for s in samples if s.power_mw is not None]
    loads = [s.gr3d_pct for s in samples if s.gr3d_pct is not None]
    rams = [s.ram_used_mib for s in samples if s.ram_used_mib is not None]
    mean_mw = sum(powers) / len(powers) if powers else None
    return PowerReport(
        available=True,
        reason=None if powers else f"no board input rail ({', '.join(INPUT_RAILS)}) in tegrastats output",
        n_samples=len(samples),
        power_rail=next((s.power_rail for s in samples if s.power_rail), None),
        mean_power_mw=mean_mw,
        energy_mj_per_image=mean_mw * total_time_s / images if mean_mw is not None and images > 0 else None,
        gr3d_mean_pct=sum(loads) / len(loads) if loads else None,
        ram_used_max_mib=max(rams) if rams else None,
        ram_total_mib=next((s.ram_total_mib for s in samples if s.ram_total_mib), None),
    )


def find_tegrastats() -> str | None:
    """Path of the tegrastats binary, or None when this is not a Jetson."""
    found = shutil.which("tegrastats")
    return found or ("/usr/bin/tegrastats" if Path("/usr/bin/tegrastats").is_file() else None)


class TegrastatsMonitor:
    """Context manager: runs ``tegrastats --interval N`` in the background and collects parsed samples.

    ``command`` replaces the tegrastats invocation (tests pass a script that prints recorded lines).
    """

    def __init__(self, interval_ms: int = 100, command: Sequence[str] | None = None) -> None:
        self.interval_ms = interval_ms
        self.command = list(command) if command is not None else self._default_command(interval_ms)
        self.samples: list[TegraSample] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @staticmethod
    def _default_command(interval_ms: int) -> list[str] | None:
        exe = find_tegrastats()
        if exe is None:
            return None
        line_buffered = [stdbuf, "-oL"] if (stdbuf := shutil.which("stdbuf")) else []
        return [*line_buffered, exe, "--interval", str(interval_ms)]

    def __enter__(self) -> TegrastatsMonitor:
        if self.command is not None:
            self._process = subprocess.Popen(
                self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if (sample := parse_line(line)) is not None:
                self.samples.append(sample)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def report(self, *, total_time_s: float, images: int) -> PowerReport:
        """Summarize the collected samples; ``available=False`` when tegrastats was not found."""
        if self.command is None:
            return PowerReport(False, "tegrastats not found (not a Jetson): power and GPU load not measured")
        return summarize_samples(self.samples, total_time_s=total_time_s, images=images)
