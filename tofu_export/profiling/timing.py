"""Timing of a callable (warm-up, device synchronization, an iteration or time budget; the clocks a comparison may
time on) and the latency statistics of the samples: percentiles of one graph's, per-round ratios of two graphs'."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tofu_export.errors import Hint, UserError
from tofu_export.profiling.errors import ProfilerError


def format_ms(ms: float) -> str:
    """A latency for a table or a figure: one decimal from 10 ms up, two below, so that a tiny model's 0.58 and
    0.63 ms do not both read 0.6."""
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


QUARTILES = (25.0, 75.0)  # the spread calibration records (``speedup_iqr``)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread-cpu": time.thread_time}


def clock_threads(clock: str, threads: int | None) -> int | None:
    """The intra-op threads to time on with ``clock`` (a name of ``CLOCKS``): the thread-CPU clock counts only the
    calling thread, so it times one thread (``threads`` None or 1); an unknown clock or more threads is a
    ``UserError`` (torch-free: the CLI checks it before loading anything)."""
    if clock not in CLOCKS:
        raise UserError(f"unknown clock {clock!r}; choose one of {', '.join(CLOCKS)}", hint=Hint("clock", "wall"))
    if clock == "thread-cpu":
        if threads not in (None, 1):
            raise UserError(f"the thread-CPU clock times one intra-op thread (the calling one), got threads={threads}",
                            hint=Hint("threads", "1"))
        return 1
    return threads


def per_round_speedup(baseline_ms: Sequence[float], other_ms: Sequence[float],
                      spread: tuple[float, float] = (10.0, 90.0)) -> tuple[float, float, float]:
    """The ``spread`` percentiles (10th and 90th unless told) around the median of the per-round ratios
    ``baseline_ms[i] / other_ms[i]`` of two graphs timed in the same rounds (load that hits a whole round cancels):
    ``(low, median, high)``, a speed-up and its spread, the median always inside. The one per-round ratio of the
    tool: the quick look, the sweep and calibration (``speedup_iqr``) all read it."""
    ratios = np.asarray(baseline_ms, dtype=np.float64) / np.asarray(other_ms, dtype=np.float64)  # [rounds]
    low, mid, high = np.percentile(ratios, [spread[0], 50.0, spread[1]])
    return float(low), float(mid), float(high)


def speedup_iqr(baseline_ms: Sequence[float], other_ms: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """``per_round_speedup`` at ``QUARTILES`` as the measured records keep it: ``(median, (q1, q3))``."""
    q1, mid, q3 = per_round_speedup(baseline_ms, other_ms, QUARTILES)
    return mid, (q1, q3)


def time_callable(
    fn: Callable[[], object],
    *,
    warmup: int,
    iters: int | None,
    budget_s: float | None,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    min_iters: int = 1,
) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed, then time each call; return the per-call durations in seconds.

    Each timed call reads ``clock`` once before and once after, calling ``sync`` (e.g.
    ``torch.cuda.synchronize``) before each read so queued device work is inside the measurement. Timing
    stops after ``iters`` samples, or once ``budget_s`` seconds (measured from the first timed call) are
    spent and at least ``min_iters`` samples were taken, whichever comes first. At least one of ``iters``
    and ``budget_s`` must be given.
    """
    if iters is None and budget_s is None:
        raise ProfilerError("time_callable needs a stopping rule: pass iters=N, budget_s=SECONDS, or both.")
    if warmup < 0 or (iters is not None and iters < 1) or min_iters < 1:
        raise ProfilerError(f"Need warmup >= 0, iters >= 1 and min_iters >= 1; got {warmup}, {iters} and {min_iters}.")
    if budget_s is not None and budget_s <= 0:
        raise ProfilerError(f"budget_s must be positive, got {budget_s}.")
    barrier = sync if sync is not None else _no_sync
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start: float | None = None
    while True:
        barrier()
        t0 = clock()
        fn()
        barrier()
        t1 = clock()
        start = t0 if start is None else start
        samples.append(t1 - t0)
        if iters is not None and len(samples) >= iters:
            return samples
        if budget_s is not None and t1 - start >= budget_s and len(samples) >= min_iters:
            return samples


def _no_sync() -> None:
    return None


@dataclass(frozen=True)
class LatencyStats:
    """Summary of ``n`` timed runs of one batch of ``batch_size`` images; all times in milliseconds.

    The one latency summary of the tool (profile, sweep, quick look). Percentiles use linear interpolation
    between order statistics (numpy's default); ``std_ms`` is the
    population standard deviation (``ddof=0``); ``throughput_ips`` is images per second, ``batch / mean``.
    """

    n: int
    batch_size: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p10_ms: float
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
        p10, p50, p90, p99 = np.percentile(ms, [10.0, 50.0, 90.0, 99.0])
        mean = float(ms.mean())
        return cls(
            n=int(ms.size),
            batch_size=batch_size,
            mean_ms=mean,
            std_ms=float(ms.std()),
            min_ms=float(ms.min()),
            p10_ms=float(p10),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p99_ms=float(p99),
            max_ms=float(ms.max()),
            throughput_ips=batch_size / (mean / 1e3) if mean > 0 else float("inf"),
        )

    @classmethod
    def from_ms(cls, samples_ms: Sequence[float], batch_size: int = 1) -> LatencyStats:
        """The same from durations in milliseconds (what round-robin timing returns)."""
        return cls.from_samples([value / 1e3 for value in samples_ms], batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
