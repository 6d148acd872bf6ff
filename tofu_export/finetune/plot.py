"""The loss plot of a fine-tuning: each step's distillation loss, its running mean, and the held-out loss before
and after (``1 - cosine`` to the unreduced model), so a person sees at once whether it helped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tofu_export.reports.png import save_png
from tofu_export.schedule import compact_r

WINDOW = 10  # steps in the running mean


def running_mean(values: list[float], window: int = WINDOW) -> list[float]:
    """The mean of the last ``window`` values (fewer at the start) at each position."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(report: dict[str, Any], path: str | Path) -> Path:
    """Write the PNG for a ``finetune`` report (its ``loss`` and held-out fidelity before / after)."""
    losses = report["loss"]
    steps = range(1, len(losses) + 1)
    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="0.75", linewidth=0.8, label="training batch")
    axes.plot(steps, running_mean(losses), color="C0", label=f"training, mean of {WINDOW} steps")
    for key, colour, name in (("held_out_before", "C3", "held out, before"),
                              ("held_out_after", "C2", "held out, after")):
        loss = 1 - report[key]["mean"]
        axes.axhline(loss, color=colour, linestyle="--", label=f"{name}: {loss:.5f}")
    axes.set_xlabel("step")
    axes.set_ylabel("1 - cosine to the unreduced model")
    axes.set_ylim(bottom=0)
    tuned = report["tuned_for"]
    axes.set_title(f"{report['architecture']}: fine-tuned for {tuned['source']}, tokens removed per block "
                   f"{compact_r(tuned['removes'])}", fontsize=10)
    axes.legend(fontsize=8)
    return save_png(figure, path)
