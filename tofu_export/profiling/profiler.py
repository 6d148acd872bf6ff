"""Profile one runner over several batch sizes: latency, optional op breakdown, memory and Jetson power."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from tofu_export.engines.base import NOISE, Runner
from tofu_export.profiling.breakdown import Breakdown, summarize
from tofu_export.profiling.device import DeviceInfo, describe_device
from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.memory import MemoryReport, measure_memory, reset_peak_memory
from tofu_export.profiling.tegrastats import PowerReport, TegrastatsMonitor
from tofu_export.profiling.timing import LatencyStats, time_callable

if TYPE_CHECKING:
    from tofu_export.profiling.images import TimingImages


@dataclass(frozen=True)
class BatchResult:
    """Everything measured for one batch size."""

    batch_size: int
    latency: LatencyStats
    memory: MemoryReport
    power: PowerReport
    breakdown: Breakdown | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "latency": self.latency.to_dict(),
            "memory": self.memory.to_dict(),
            "power": self.power.to_dict(),
            "breakdown": self.breakdown.to_dict() if self.breakdown is not None else None,
        }


@dataclass(frozen=True)
class ProfileResult:
    """A backend's results for each requested batch size, the device they were taken on and what the runs were fed."""

    backend: str
    device: DeviceInfo
    batches: list[BatchResult]
    timed_on: str = NOISE

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device.to_dict(),
            "batches": [batch.to_dict() for batch in self.batches],
            "timed_on": self.timed_on,
        }


def profile(
    backend: Runner,
    *,
    batch_sizes: Sequence[int],
    warmup: int = 10,
    iters: int | None = 100,
    budget_s: float | None = None,
    breakdown: bool = False,
    breakdown_iters: int = 10,
    top_n: int = 10,
    tegrastats_interval_ms: int = 100,
    images: TimingImages | None = None,
) -> ProfileResult:
    """Time ``backend.run`` per batch size (see ``time_callable``), then optionally profile its ops; on ``images``
    where given (batch B: the first B of them, repeated when B is larger), else on seeded noise.

    Power is sampled only during the timed runs; op profiling runs afterwards so it cannot skew latency.
    """
    if not batch_sizes or any(batch < 1 for batch in batch_sizes):
        raise ProfilerError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes}.")
    if images is not None:
        backend.feed_images(images.images)
    results = []
    for batch in batch_sizes:
        reset_peak_memory(backend.device)
        for _ in range(warmup):
            backend.run(batch)
        with TegrastatsMonitor(tegrastats_interval_ms) as monitor:
            run = partial(backend.run, batch)
            samples = time_callable(run, warmup=0, iters=iters, budget_s=budget_s, sync=backend.sync)
        memory = measure_memory(backend.device)  # before op profiling, which allocates trace buffers
        parts = summarize(backend.profile_ops(batch, breakdown_iters), top_n=top_n) if breakdown else None
        results.append(
            BatchResult(
                batch_size=batch,
                latency=LatencyStats.from_samples(samples, batch),
                memory=memory,
                power=monitor.report(total_time_s=sum(samples), images=batch * len(samples)),
                breakdown=parts,
            )
        )
    return ProfileResult(backend=backend.name, device=describe_device(), batches=results,
                         timed_on=NOISE if images is None else images.description)
