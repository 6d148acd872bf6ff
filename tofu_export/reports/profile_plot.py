"""The profile report's figure: latency and throughput per batch size, and where the time goes where it was measured.

One line per backend on the left (p50 per batch, whiskers to p90 and p99, images/s written beside each point); on
the right, where the op profiler ran, one stacked bar per (backend, batch) of the per-part time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tofu_export.profiling.breakdown import CATEGORIES
from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.profiler import ProfileResult
from tofu_export.reports.png import save_png

_PART_COLORS = {"attention": "#1f77b4", "mlp": "#ff7f0e", "token_reduction": "#d62728", "embed": "#2ca02c",
                "head": "#9467bd", "other": "#7f7f7f"}


def plot_profile(results: Sequence[ProfileResult], path: str | Path) -> Path:
    """Write the PNG of ``results`` (one or more backends, each with its batch sizes) to ``path``; returns it."""
    if not any(result.batches for result in results):
        raise ProfilerError("plot_profile needs at least one measured batch size.")
    profiled = [(result.backend, batch) for result in results for batch in result.batches if batch.breakdown]
    panels = 2 if profiled else 1
    figure = Figure(figsize=(5.2 * panels, 4.2), dpi=110, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    _latency_panel(axes[0], results)
    if profiled:
        _parts_panel(axes[1], profiled, several=len(results) > 1)
    device = results[0].device
    where = device.gpu_name or device.board or device.cpu_model or "an unknown device"
    figure.suptitle(f"{', '.join(result.backend for result in results)} on {where}", fontsize="medium")
    return save_png(figure, path)


def _latency_panel(axes: Any, results: Sequence[ProfileResult]) -> None:
    """p50 per batch size, whiskers to p90 and p99 (the upper tail is what a deployment waits for), images/s."""
    for result in results:
        stats = [batch.latency for batch in result.batches]
        sizes = [lat.batch_size for lat in stats]
        p50 = [lat.p50_ms for lat in stats]
        line = axes.errorbar(sizes, p50, yerr=[[0.0] * len(stats), [lat.p90_ms - lat.p50_ms for lat in stats]],
                             marker="o", capsize=4, label=f"{result.backend} (whisker: p90)")
        axes.scatter(sizes, [lat.p99_ms for lat in stats], marker="_", s=120, color=line[0].get_color(),
                     label="p99")
        for lat in stats:
            axes.annotate(f"{lat.throughput_ips:.0f} img/s", (lat.batch_size, lat.p50_ms), textcoords="offset points",
                          xytext=(6, -10), fontsize="small")
    if any(len(result.batches) > 1 for result in results):
        axes.set_xscale("log", base=2)
    measured = sorted({batch.batch_size for result in results for batch in result.batches})
    axes.set_xticks(measured, [str(size) for size in measured])
    axes.set(xlabel="batch size", ylabel="latency per batch, p50 (ms)", ylim=(0, None),
             title="Latency and throughput")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")


def _parts_panel(axes: Any, profiled: Sequence[tuple[str, Any]], *, several: bool) -> None:
    """One stacked bar per profiled (backend, batch): the per-part time, ms per run."""
    labels = [f"{backend}\nbatch {batch.batch_size}" if several else f"batch {batch.batch_size}"
              for backend, batch in profiled]
    bottoms = [0.0] * len(profiled)
    for part in CATEGORIES:
        values = [batch.breakdown.by_category_ms.get(part, 0.0) for _, batch in profiled]
        if not any(values):
            continue
        axes.bar(labels, values, bottom=bottoms, color=_PART_COLORS[part], label=part.replace("_", " "))
        bottoms = [bottom + value for bottom, value in zip(bottoms, values, strict=True)]
    axes.set(ylabel="ms per run (op profiler)", title="Where the time goes")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")
