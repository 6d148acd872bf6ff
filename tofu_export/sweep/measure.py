"""Time the sweep's points on one backend: all round-robin in one process (the default), or each alone.

Round-robin (``profiling.compare.time_round_robin``: a fresh random order every round, each timed run right after
an untimed one of the same point) lets a slow spell of a shared machine hit every point alike, and pairs the points
by round: round ``i`` of the baseline and round ``i`` of a point ran close in time, so their ratio is a per-round
speed-up whose spread says how sure the ranking is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tofu_export.profiling.compare import time_round_robin
from tofu_export.profiling.timing import time_callable

Runner = Any  # engines.base.Runner


def _call(runner: Runner, batch: int) -> Callable[[], None]:
    """One inference of ``batch`` images, finished (queued device work synchronised)."""

    def call() -> None:
        runner.run(batch)
        runner.sync()

    return call


def time_interleaved(
    runners: Mapping[str, Runner], *, iters: int, warmup: int = 5, on_round: Callable[[], None] | None = None,
    batch: int = 1,
) -> dict[str, list[float]]:
    """Per point, ``iters`` latencies in ms of a ``batch``, round ``i`` of every point taken in the same round."""
    calls = {key: _call(runner, batch) for key, runner in runners.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    return time_round_robin(calls, iters=iters, on_round=on_round)


def time_alone(runner: Runner, *, iters: int, warmup: int = 5, batch: int = 1) -> list[float]:
    """``iters`` latencies in ms of a ``batch``, of one point timed on its own."""
    return [s * 1e3 for s in time_callable(_call(runner, batch), warmup=warmup, iters=iters, budget_s=None)]
