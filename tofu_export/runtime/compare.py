"""Compare ONNX models' CPU latency fairly: one process, round-robin runs, no thread spinning.

ONNX Runtime's idle worker threads spin for a while after each run. When several sessions are timed in turn,
a session's spinning workers steal the cores from the next one, so each session here is created with spinning
off; running them round-robin spreads background load over all of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tofu_export.runtime.ort_backend import session_options


def interleaved_latency_ms(
    models: Mapping[str, Path],
    *,
    threads: int | None,
    warmup: int,
    iters: int,
    batch_size: int = 1,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Per model, ``iters`` latencies in ms of ``batch_size`` random images, runs interleaved across models.

    ``on_round`` is called after each of the ``iters`` rounds (one run of every model), e.g. to advance a progress bar.
    """
    options = session_options(threads, spinning=False)
    cpu = ["CPUExecutionProvider"]
    sessions = {name: ort.InferenceSession(str(path), options, providers=cpu) for name, path in models.items()}
    feeds = {}
    for name, session in sessions.items():
        model_input = session.get_inputs()[0]
        shape = [batch_size, *(int(d) for d in model_input.shape[1:])]
        feeds[name] = {model_input.name: np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)}
        for _ in range(warmup):
            session.run(None, feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(iters):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            samples[name].append((time.perf_counter() - start) * 1e3)
        if on_round is not None:
            on_round()
    return samples
