"""A denoiser policy's speed-up, measured: the policy's step and the unreduced step exported as the user exports
(``dense.export.export_denoiser``: exporter, opset, simplification; parity and the TensorRT check off, these graphs
are not the artifact; side by side in forked workers, one per core, ``exporters.workers``), opened with the one ONNX
Runtime session factory (``engines.ort.create_session``, no spinning) and timed round-robin in one process
(``profiling.compare.time_round_robin``: its shuffled order, an untimed run before each timed one, on the wall clock
or the calling thread's CPU clock). ``engines.ort.OrtRunner`` feeds one image input; a denoiser step has two or
three, so the session is fed directly.

Other policies (calibration passes ToMe for SD at the same ratio) are timed in the same rounds. A speed-up is the
median of the per-round ratios (load that hits both graphs in a round cancels), with their
quartiles as the spread; each graph's latencies are summarised by ``profiling.timing.LatencyStats``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from torch import nn

from tofu_export.dense.export import export_denoiser
from tofu_export.dense.plan import DensePolicy
from tofu_export.exporters.workers import export_workers, run_jobs, weight_bytes

Inputs = Callable[[int, int], tuple]


@dataclass(frozen=True)
class StepLatency:
    """The policy's step against the unreduced one, batch 1 (milliseconds; ``speedup``: median per-round ratio);
    ``compared``: other policies timed in the same rounds (name -> ``speedup``, ``speedup_iqr``, ``latency``)."""

    baseline: dict  # LatencyStats.to_dict()
    policy: dict
    speedup: float
    speedup_iqr: tuple[float, float]
    rounds: int
    clock: str
    threads: int | None
    exporter: str
    opset: int
    backend: str
    load_average: tuple[float, float]  # 1-minute load average before and after the timing
    compared: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(asdict(self), speedup_iqr=list(self.speedup_iqr), load_average=list(self.load_average))


def measure_step_latency(step: nn.Module, patch: Callable[[DensePolicy], object], policy: DensePolicy,
                         make_inputs: Inputs, input_names: Sequence[str], *, exporter: str, opset: int,
                         rounds: int = 20, clock: str = "wall", threads: int | None = None,
                         compare: Mapping[str, DensePolicy] | None = None) -> StepLatency:
    """Export ``step`` unreduced, patched with ``policy`` and with every policy of ``compare`` (``patch`` applies
    one; the step is left unreduced), then time them interleaved for ``rounds`` rounds on ``make_inputs(1, 0)``
    (module docstring)."""
    from tofu_export.engines.ort import create_session
    from tofu_export.profiling.compare import time_round_robin
    from tofu_export.profiling.timing import LatencyStats, clock_threads, speedup_iqr

    threads = clock_threads(clock, threads)
    feed_inputs = make_inputs(1, 0)
    variants = {"baseline": DensePolicy({}, policy.stride, policy.seed), "policy": policy, **(compare or {})}
    with tempfile.TemporaryDirectory(prefix="tofu-denoiser-latency-") as tmp:
        paths = {name: Path(tmp) / f"{i}.onnx" for i, name in enumerate(variants)}

        def export(name: str) -> None:  # a job: patches the step it runs on, so the jobs run in any order
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch(variants[name])
                export_denoiser(step, paths[name], make_inputs, input_names, opset=opset, exporter=exporter,
                                verify=False, trt_check=False)

        try:
            run_jobs([partial(export, name) for name in variants], export_workers(len(variants), weight_bytes(step)))
        finally:
            patch(variants["baseline"])
        sessions = {name: create_session(path, threads=threads, spinning=False) for name, path in paths.items()}
        feeds = {name: {i.name: t.numpy() for i, t in zip(s.get_inputs(), feed_inputs, strict=True)}
                 for name, s in sessions.items()}
        for name, session in sessions.items():
            session.run(None, feeds[name])  # warm-up outside the timing
        before = os.getloadavg()[0]
        samples = time_round_robin({name: (lambda s=session, f=feeds[name]: s.run(None, f))
                                    for name, session in sessions.items()}, iters=rounds, clock=clock)
        after = os.getloadavg()[0]

    compared = {}
    for name in compare or {}:
        speedup, iqr = speedup_iqr(samples["baseline"], samples[name])
        compared[name] = {"speedup": speedup, "speedup_iqr": iqr,
                          "latency": LatencyStats.from_ms(samples[name]).to_dict()}
    speedup, iqr = speedup_iqr(samples["baseline"], samples["policy"])
    return StepLatency(LatencyStats.from_ms(samples["baseline"]).to_dict(),
                       LatencyStats.from_ms(samples["policy"]).to_dict(), speedup, iqr, rounds, clock, threads,
                       exporter, opset, "onnxruntime-cpu", (before, after), compared)
