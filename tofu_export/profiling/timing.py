"""Wall-clock timing of a callable with warm-up, device synchronization and an iteration or time budget."""

from __future__ import annotations

import time
from collections.abc import Callable

from tofu_export.runtime.errors import ProfilerError


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
