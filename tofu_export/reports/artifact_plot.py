"""The artifact report's figure: tokens entering each block, and the quick look's latency bars (baseline vs ToFu).

Uses matplotlib's object API (``reports.png`` writes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tofu_export.manifest import QuickLatency
from tofu_export.profiling.timing import format_ms
from tofu_export.quicklook import LABEL
from tofu_export.reports.png import save_png

BASELINE_COLOR, TOFU_COLOR = "#7f7f7f", "#1f77b4"


def plot_artifact(path: str | Path, tokens: Sequence[int], latency: QuickLatency | None, label: str) -> Path:
    """Write the PNG: tokens per block (the unreduced model keeps ``tokens[0]`` in every block) and, given the quick
    look's ``latency`` section, batch-1 p50 bars with p10-p90 whiskers and the speed-up. ``label`` names the ToFu
    side ("ToFu r=16"). Returns ``path``."""
    panels = 2 if latency else 1
    figure = Figure(figsize=(4.2 * panels + 0.6, 3.4), dpi=110, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    _tokens_panel(axes[0], tokens, label)
    if latency:
        _latency_panel(axes[1], latency, label)
    return save_png(figure, path)


def _tokens_panel(axes: Any, tokens: Sequence[int], label: str) -> None:
    blocks = list(range(len(tokens)))
    axes.step(blocks, [tokens[0]] * len(tokens), where="mid", color=BASELINE_COLOR, label="baseline (r=0)")
    axes.step(blocks, list(tokens), where="mid", color=TOFU_COLOR, label=label, linewidth=2)
    axes.fill_between(blocks, list(tokens), [tokens[0]] * len(tokens), step="mid", color=TOFU_COLOR, alpha=0.12)
    axes.set(xlabel="block", ylabel="tokens entering the block", title="Tokens per block", ylim=(0, tokens[0] * 1.1))
    axes.set_xticks(blocks)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # tokens are counts: a 17-token model had 2.5, 7.5, ...
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")


def _latency_panel(axes: Any, latency: QuickLatency, label: str) -> None:
    sides = [("baseline\n(r=0)", latency.baseline, BASELINE_COLOR), (label.replace(" ", "\n", 1), latency.tofu,
                                                                       TOFU_COLOR)]
    p50 = [side.p50_ms for _, side, _ in sides]
    whiskers = [[s.p50_ms - s.p10_ms for _, s, _ in sides], [s.p90_ms - s.p50_ms for _, s, _ in sides]]
    bars = axes.bar([name for name, _, _ in sides], p50, yerr=whiskers, capsize=6,
                    color=[color for _, _, color in sides])
    axes.bar_label(bars, labels=[f"{format_ms(value)} ms" for value in p50], label_type="center", color="white",
                   fontweight="bold")
    load = f", load {latency.load[0]:.1f}" if latency.load else ""
    verdict = f"{latency.speedup:.2f}x faster" if latency.speedup >= 1 else f"{1 / latency.speedup:.2f}x slower"
    axes.set(ylabel=f"latency, batch {latency.batch} (ms)", title=f"{verdict} (p50; whiskers p10-p90{load})")
    axes.text(0.5, -0.22, LABEL, transform=axes.transAxes, ha="center",
              fontsize="small", style="italic")
    axes.grid(axis="y", alpha=0.3)
