"""Latency statistics over a list of per-run wall-clock samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tofu_export.runtime.errors import ProfilerError


@dataclass(frozen=True)
class LatencyStats:
    """Summary of ``n`` timed runs of one batch of ``batch_size`` images; all times in milliseconds.

    Percentiles use linear interpolation between order statistics (numpy's default); ``std_ms`` is the
    population standard deviation (``ddof=0``); ``throughput_ips`` is images per second, ``batch / mean``.
    """

    n: int
    batch_size: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_ips: float

    @classmethod
    def from_samples(cls, samples_s: Sequence[float], batch_size: int) -> LatencyStats:
        """Build the summary from per-run durations in seconds (one sample = one batch)."""
        if len(samples_s) == 0:
            raise ProfilerError("LatencyStats needs at least one timing sample; got an empty list.")
        if batch_size < 1:
            raise ProfilerError(f"batch_size must be a positive integer, got {batch_size}.")
        ms = np.asarray(samples_s, dtype=np.float64) * 1e3
        if not np.all(np.isfinite(ms)) or np.any(ms < 0):
            raise ProfilerError("Timing samples must be finite, non-negative durations in seconds.")
        p50, p90, p99 = np.percentile(ms, [50.0, 90.0, 99.0])
        mean = float(ms.mean())
        return cls(
            n=int(ms.size),
            batch_size=batch_size,
            mean_ms=mean,
            std_ms=float(ms.std()),
            min_ms=float(ms.min()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            max_ms=float(ms.max()),
            throughput_ips=batch_size / (mean / 1e3) if mean > 0 else float("inf"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
