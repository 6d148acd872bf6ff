"""A PNG of a calibration: per-block damage per mode, the linearity criterion, the latency each mode adds, and
the chosen mode of every block."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tofu_export.policy import Policy
from tofu_export.reports.png import save_png

_COLORS = {"prune": "tab:red", "mean": "tab:blue", "mlerp": "tab:green"}
_FLOOR = 1e-7  # damage below this is drawn at the floor of the log axis
_PER_ROW = 12  # blocks per line of the title's policy


def damage_images(images: dict) -> int | str:
    """How many images the damage per block was measured on, from a policy source's ``images`` record: its
    ``damage`` count, else (records before it) the search images, ``count`` less ``held_out``; ``"?"`` unknown."""
    if "damage" in images:
        return images["damage"]
    return images["count"] - images.get("held_out", 0) if "count" in images else "?"


def plot_policy(policy: Policy, path: str | Path) -> Path:
    """Write the three-panel figure of ``policy.measurements`` to ``path`` (PNG, atomic); returns the path."""
    m = policy.measurements
    blocks = list(range(policy.depth))
    figure = Figure(figsize=(8, 9), dpi=110, layout="constrained")
    damage_ax, linear_ax, latency_ax = figure.subplots(3, 1)

    for mode, values in m["damage"].items():
        damage_ax.plot(blocks, [max(v, _FLOOR) for v in values], marker="o", color=_COLORS.get(mode), label=mode)
    for i, (mode, removed) in enumerate(zip(policy.modes, policy.r, strict=True)):
        if removed:
            at_r = m.get("damage_by_r", {}).get(mode, {}).get(str(removed), m["damage"][mode])  # the chosen r's
            damage_ax.scatter([i], [max(at_r[i], _FLOOR)], s=160, facecolors="none",
                              edgecolors="black", linewidths=1.5, zorder=3)
            damage_ax.annotate(str(removed), (i, max(at_r[i], _FLOOR)), fontsize=7, textcoords="offset points",
                               xytext=(6, 6))
    damage_ax.set_yscale("log")
    damage_ax.set(xlabel="block", ylabel=f"1 - cosine of the output (< {_FLOOR:g} drawn at it)",
                  title=f"Damage of removing r={m['r']} tokens in one block alone\n(circled: chosen, at its r; "
                        f"{damage_images(policy.source.get('images', {}))} images)")
    damage_ax.legend(title="mode")

    means = [x["mean"] for x in m["linearity"]]
    p90 = [x["p90"] for x in m["linearity"]]
    linear_ax.bar(blocks, means, color="tab:gray", label="mean over matched pairs")
    linear_ax.plot(blocks, p90, "k_", markersize=14, label="90th percentile")
    linear_ax.set(xlabel="block", ylabel="non-linearity",
                  title="Linearity criterion ||f(mid) - mid(f)|| / ||f(y1) - f(y2)|| on the pairs matching reduces")
    linear_ax.legend()

    lat = m["latency"]
    for mode in _COLORS:
        added = [b - a for a, b in zip(lat["block_ms"]["none"], lat["block_ms"][mode], strict=True)]
        latency_ax.plot(lat["tokens"], added, marker="o", color=_COLORS[mode], label=mode)
    latency_ax.axhline(0.0, color="black", linewidth=0.8)
    latency_ax.set(xlabel="tokens entering the block", ylabel="ms vs the same block without reduction",
                   title=f"Latency a reducing block adds ({lat['backend']}, batch 1, median of {lat['rounds']} rounds)")
    latency_ax.legend(title="mode")

    for axes in (damage_ax, linear_ax, latency_ax):  # blocks and tokens are counts: no tick at block 0.5
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    chosen = [f"{mode[:2]}{r}" if r else "-" for mode, r in zip(policy.modes, policy.r, strict=True)]
    rows = [" ".join(chosen[i:i + _PER_ROW]) for i in range(0, len(chosen), _PER_ROW)]  # a deep model's fit too
    figure.suptitle("\n".join(["policy, mode and r per block (pr prune, me mean, ml MLERP, - none):", *rows,
                               f"predicted cosine {m['predicted_cosine']:.5f}, measured {m['measured_cosine']:.5f}; "
                               f"predicted {m['predicted_speedup']:.2f}x"]), fontsize=10)
    return save_png(figure, path)
