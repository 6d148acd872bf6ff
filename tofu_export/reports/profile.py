"""Human- and machine-readable profile reports: Markdown tables and JSON."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tofu_export.atomic import write_json_atomic, write_text_atomic
from tofu_export.profiling.breakdown import CATEGORIES, categorize
from tofu_export.profiling.profiler import ProfileResult

_LATENCY_HEADERS = [
    "backend", "batch", "n", "mean ms", "p50 ms", "p90 ms", "p99 ms", "img/s",
    "peak RSS MiB", "CUDA peak MiB", "power W", "mJ/img",
]  # fmt: skip


def render_table(results: Sequence[ProfileResult]) -> str:
    """Markdown latency table (one row per backend and batch size), plus a breakdown table when profiled."""
    rows = []
    for result in results:
        for batch in result.batches:
            lat, mem, power = batch.latency, batch.memory, batch.power
            watts = None if power.mean_power_mw is None else power.mean_power_mw / 1e3
            rows.append([
                result.backend, lat.batch_size, lat.n, lat.mean_ms, lat.p50_ms, lat.p90_ms, lat.p99_ms,
                lat.throughput_ips, mem.peak_rss_mib, mem.cuda_peak_allocated_mib, watts,
                power.energy_mj_per_image,
            ])  # fmt: skip
    text = _markdown_table(*_drop_empty(_LATENCY_HEADERS, rows))
    breakdown = render_breakdown(results)
    heading = "Per-part time (op profiler, per run; on a GPU the kernel time, without launch gaps):"
    return text + (f"\n\n{heading}\n\n{breakdown}" if breakdown else "")


def render_breakdown(results: Sequence[ProfileResult]) -> str:
    """Markdown table of the per-part time (attention, MLP, token reduction, rest) per batch; empty when none."""
    parts = [
        [result.backend, batch.batch_size, *batch.breakdown.by_category_ms.values(), batch.breakdown.total_ms]
        for result in results
        for batch in result.batches
        if batch.breakdown is not None
    ]
    if not parts:
        return ""
    headers = ["backend", "batch", *(f"{name} ms" for name in CATEGORIES), "sum ms"]
    return _markdown_table(headers, parts)


def write_markdown(path: str | Path, results: Sequence[ProfileResult], *, title: str = "Latency profile") -> Path:
    """Report with the device description, the tables of ``render_table`` and the slowest ops per batch."""
    inputs = sorted({result.timed_on for result in results})
    sections = [f"# {title}", _device_section(results), "Timed on: " + "; ".join(inputs) + ".",
                render_table(results)]
    for result in results:
        for batch in result.batches:
            if batch.breakdown is not None and batch.breakdown.top_ops:
                rows = [[op.name, op.op_type, categorize(op.name, op.op_type), op.ms] for op in batch.breakdown.top_ops]
                heading = f"## Slowest ops: {result.backend}, batch {batch.batch_size}"
                sections.append(heading + "\n\n" + _markdown_table(["op", "type", "category", "ms"], rows))
    return write_text_atomic(path, "\n\n".join(sections) + "\n")


def write_json(path: str | Path, results: Sequence[ProfileResult] | Any) -> Path:
    """Write profile results (or any JSON-serializable data) atomically."""
    if isinstance(results, Sequence) and all(isinstance(r, ProfileResult) for r in results):
        results = [result.to_dict() for result in results]
    return write_json_atomic(path, results)


def _device_section(results: Sequence[ProfileResult]) -> str:
    devices = {str(result.device.to_dict()): result.device for result in results}
    lines = []
    for device in devices.values():
        lines.append(
            f"Device: {device.board or device.cpu_model or 'unknown CPU'} ({device.cpu_cores} cores)"
            f"{f', GPU {device.gpu_name}' if device.gpu_name else ''}; torch {device.torch}, "
            f"onnxruntime {device.onnxruntime}, tensorrt {device.tensorrt}; {device.platform}"
        )
    return "\n".join(lines) + "\n\nPeak RSS is the whole process's high-water mark, not the model alone."


def _drop_empty(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[list[str], list[list[object]]]:
    """Leave out the columns nothing was measured in (no power without tegrastats, no CUDA memory on a CPU)."""
    keep = [i for i in range(len(headers)) if any(row[i] is not None for row in rows)] if rows else []
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value).replace("|", "\\|")
