"""The sweep's table: one row per point with its latency spread, speed-up over the r = 0 baseline (interleaved: the
median and spread of the per-round ratios), fidelity (with its standard error), and a flag where the spread makes the
ranking uncertain.

A row is a plain dict (``sweep.json`` carries it as is); ``table_cells`` formats it the same way for sweep.md and the
terminal, so both say the same thing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from tofu_export.profiling.timing import LatencyStats, per_round_speedup
from tofu_export.sweep.state import BASELINE

UNCERTAIN = "~"  # the flag: this point's speed-up interval overlaps a neighbour's in the ranking
COLUMNS = ("point", "GFLOPs", "latency p50 (p10-p90)", "speed-up (p10-p90)", "fidelity", "rank")


def sweep_row(record: dict[str, Any], baseline_ms: Sequence[float] | None, paired: bool,
              batch: int = 1) -> dict[str, Any]:
    """The row of one finished sweep record (``sweep.state.run_sweep``); ``baseline_ms``: the baseline's samples
    (None: no r = 0 point); ``paired``: the samples were taken round-robin, round ``i`` of every point together;
    ``batch``: the images each timed run took."""
    latency = record["profile"]
    samples = np.asarray(latency["samples_ms"], dtype=np.float64)  # [rounds]
    stats = LatencyStats.from_ms(samples.tolist(), batch)
    p10, p50, p90 = stats.p10_ms, stats.p50_ms, stats.p90_ms
    row: dict[str, Any] = {"mode": record["mode"], "r": record["r"], "gflops": latency["gflops"],
                           "latency_ms": p50, "p10_ms": p10, "p90_ms": p90, "rounds": stats.n,
                           "images_per_s": stats.throughput_ips}  # fmt: skip
    if baseline_ms is not None:
        base = np.asarray(baseline_ms, dtype=np.float64)
        if paired and base.size == samples.size:  # the per-round ratios: load that hits a whole round cancels
            low, mid, high = per_round_speedup(base, samples)
        else:  # timed apart: the baseline's median over this point's p90, p50 and p10
            low, mid, high = (float(np.median(base)) / ms for ms in (p90, p50, p10))
        row["speedup"], row["speedup_p10"], row["speedup_p90"] = float(mid), float(low), float(high)
    metrics = (record.get("eval") or {}).get("metrics", {})
    accuracy = metrics.get("candidate_top1", metrics.get("candidate_knn_top1"))
    if accuracy is not None:
        row["accuracy"] = accuracy
        row["reference_accuracy"] = metrics.get("reference_top1", metrics.get("reference_knn_top1"))
        row["accuracy_metric"] = "top-1" if "candidate_top1" in metrics else "k-NN top-1"  # a backbone's: k-NN
    if "cosine_mean" in metrics:
        row["cosine"] = metrics["cosine_mean"]
        row["cosine_se"] = metrics.get("cosine_se")
    return row


def flag_uncertain(rows: list[dict[str, Any]]) -> None:
    """Rank the points by speed-up (or by latency without a baseline) and set ``rank`` (1 = fastest) and
    ``uncertain``: the point's p10-p90 interval overlaps the next faster or slower point's, so their order is not
    established by this run."""
    def interval(row: dict[str, Any]) -> tuple[float, float]:
        if "speedup" in row:
            return row["speedup_p10"], row["speedup_p90"]
        return -row["p90_ms"], -row["p10_ms"]  # higher is faster, like a speed-up

    order = sorted(rows, key=lambda row: -interval(row)[0] - interval(row)[1])
    for rank, row in enumerate(order, start=1):
        row["rank"], row["uncertain"] = rank, False
    for faster, slower in itertools.pairwise(order):
        if interval(faster)[0] <= interval(slower)[1]:
            faster["uncertain"] = slower["uncertain"] = True


def table_cells(row: dict[str, Any]) -> list[str]:
    """The row as ``COLUMNS`` cells, with units; ``-`` where a figure was not measured (and the caption says why)."""
    point = "baseline (r=0)" if row["mode"] == BASELINE else f"{row['mode']} r={row['r']}"
    latency = f"{row['latency_ms']:.2f} ms ({row['p10_ms']:.2f}-{row['p90_ms']:.2f})"
    speedup = "-"
    if "speedup" in row:
        speedup = f"{row['speedup']:.2f}x ({row['speedup_p10']:.2f}-{row['speedup_p90']:.2f})"
    return [point, f"{row['gflops']:.2f}", latency, speedup, fidelity_cell(row),
            f"{row['rank']}{UNCERTAIN if row['uncertain'] else ''}"]


def fidelity_cell(row: dict[str, Any]) -> str:
    """``top-1 71.2% (unreduced 72.0%)`` for a classifier; ``cosine 0.9988 ± 0.0001`` for a backbone, and its
    ``k-NN top-1 40.0% (unreduced 42.0%)`` where the data had a train split (accuracies in %); ``-`` when nothing was
    scored."""
    parts = []
    if "cosine" in row:
        se = row.get("cosine_se")
        parts.append(f"cosine {row['cosine']:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
    if "accuracy" in row:
        reference = row.get("reference_accuracy")
        parts.append(f"{row.get('accuracy_metric', 'top-1')} {row['accuracy']:.1f}%"
                     + (f" (unreduced {reference:.1f}%)" if reference is not None else ""))
    return "; ".join(parts) or "-"


def shown_columns(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of ``COLUMNS`` worth showing: no speed-up column without a baseline, no fidelity one unscored."""
    hidden = set()
    if not any("speedup" in row for row in rows):
        hidden.add(COLUMNS.index("speed-up (p10-p90)"))
    if not any("accuracy" in row or "cosine" in row for row in rows):
        hidden.add(COLUMNS.index("fidelity"))
    return [index for index in range(len(COLUMNS)) if index not in hidden]


def sweep_markdown(rows: Sequence[dict[str, Any]], title: str, caption: Sequence[str]) -> str:
    """A Markdown document: ``title``, the ``caption`` lines (how it was measured), and the table."""
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    shown = shown_columns(rows)
    lines = [f"# {title}", "", *caption, "", "| " + " | ".join(COLUMNS[i] for i in shown) + " |",
             "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(escape(table_cells(row)[i]) for i in shown) + " |" for row in rows]
    return "\n".join(lines) + "\n"
