"""PNG plots of a sweep: latency against the reduction rate r, and the latency/accuracy Pareto front.

Uses matplotlib's object API (``reports.png`` writes it: no display, no global backend switch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tofu_export.profiling.errors import ProfilerError
from tofu_export.reports.pareto import TradeoffPoint, _field, pareto_front
from tofu_export.reports.png import save_png
from tofu_export.sweep.state import BASELINE

PointLike = TradeoffPoint | Mapping[str, Any] | Any


def plot_latency_vs_r(points: Iterable[PointLike], path: str | Path, note: str | None = None) -> Path:
    """One line per mode: median latency (ms) against r, with p10-p90 whiskers where the points carry
    ``p10_ms``/``p90_ms`` (sweep rows), from 0 ms so differences are not magnified. ``note`` (how it was
    measured: rounds, load) goes under the title. Writes a PNG atomically and returns its path."""
    raw = list(points)
    coerced = [TradeoffPoint.coerce(point) for point in raw]
    if not coerced:
        raise ProfilerError("plot_latency_vs_r needs at least one point.")
    spread = {(p.mode, p.r): (_field(point, "p10_ms"), _field(point, "p90_ms")) for p, point in zip(coerced, raw,
                                                                                                 strict=True)}
    figure = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    for mode, group in _by_mode(coerced, share_baseline=True).items():
        group.sort(key=lambda p: p.r)
        low = [p.latency_ms - (spread[p.mode, p.r][0] or p.latency_ms) for p in group]
        high = [(spread[p.mode, p.r][1] or p.latency_ms) - p.latency_ms for p in group]
        axes.errorbar([p.r for p in group], [p.latency_ms for p in group], yerr=[low, high], marker="o", capsize=4,
                      label=mode)
    axes.set(xlabel="tokens removed per block (r)", ylabel="latency, median (ms)", ylim=(0, None))
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # r is a count: no tick at r = 0.5
    axes.set_title("Latency vs reduction rate" + (f"\n{note}" if note else ""), fontsize="medium")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    return save_png(figure, path)


def plot_pareto(points: Iterable[PointLike], path: str | Path) -> Path:
    """Accuracy against latency, one colour per mode, points labelled with r, the Pareto front as a line."""
    coerced = [p for p in map(TradeoffPoint.coerce, points) if p.accuracy is not None]
    if not coerced:
        raise ProfilerError("plot_pareto needs points with an accuracy; run the sweep with evaluation enabled.")
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for mode, group in _by_mode(coerced).items():
        axes.scatter([p.latency_ms for p in group], [p.accuracy for p in group], label=mode, zorder=3)
        for p in group:
            axes.annotate(f"r={p.r}", (p.latency_ms, p.accuracy), textcoords="offset points", xytext=(4, 4))
    front = pareto_front(coerced)
    axes.step(
        [p.latency_ms for p in front],
        [p.accuracy for p in front],
        where="post",
        color="black",
        alpha=0.5,
        label="Pareto front",
    )
    axes.set(xlabel="latency (ms)", ylabel="accuracy", title="Speed / accuracy trade-off")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_png(figure, path)


def _by_mode(points: list[TradeoffPoint], *, share_baseline: bool = False) -> dict[str, list[TradeoffPoint]]:
    """Points grouped by mode; with ``share_baseline`` the ``baseline`` (r = 0) points open every mode's line."""
    groups: dict[str, list[TradeoffPoint]] = {}
    for point in points:
        groups.setdefault(point.mode, []).append(point)
    if share_baseline and BASELINE in groups and len(groups) > 1:
        baseline = groups.pop(BASELINE)
        groups = {mode: baseline + group for mode, group in groups.items()}
    return groups
