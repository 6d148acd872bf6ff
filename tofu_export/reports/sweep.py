"""The sweep's table: one row per point (mode, r, latency, throughput, GFLOPs, accuracy), as Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def sweep_row(record: dict[str, Any]) -> dict[str, Any]:
    """The table row of one finished sweep record (see ``sweep.state.run_sweep``)."""
    latency = record["profile"]
    row = {"mode": record["mode"], "r": record["r"], "latency_ms": latency["p50_ms"], "p90_ms": latency["p90_ms"],
           "images_per_s": latency["throughput_ips"], "gflops": latency["gflops"]}  # fmt: skip
    metrics = (record.get("eval") or {}).get("metrics", {})
    accuracy = metrics.get("candidate_top1", metrics.get("candidate_knn_top1"))
    if accuracy is not None:
        row["accuracy"] = accuracy
    if "cosine_mean" in metrics:
        row["cosine"] = metrics["cosine_mean"]
    return row


def sweep_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """A Markdown document: ``title`` and one table whose columns are every key of ``rows``, in order seen."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
