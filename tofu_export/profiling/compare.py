"""Compare ONNX models' CPU latency fairly: one process, round-robin runs in a shuffled order, no thread spinning.

- ONNX Runtime's idle worker threads spin for a while after each run. When several sessions are timed in turn,
  a session's spinning workers steal the cores from the next one, so each session here is created with spinning
  off.
- Running the models round-robin spreads background load (other tenants of a VM) over all of them alike.
- A run that directly follows another model's pays for that model's caches: in a fixed order the model timed
  right after the largest one looked up to ~1.5 ms (5%) slower on deit_small than in any other slot. So every
  round visits the models in a fresh (seeded) random order, and each timed run follows one untimed run of the
  same model: what is timed is a model running again, as it does when it serves a stream of images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tofu_export.engines.ort import OrtRunner
from tofu_export.profiling.timing import CLOCKS, time_callable


def open_ort_runners(
    models: Mapping[str, Path],
    *,
    threads: int | None,
    warmup: int,
    batch_size: int = 1,
    seed: int = 0,
    provider: str = "cpu",
    images: Any | None = None,
) -> dict[str, OrtRunner]:
    """An ``OrtRunner`` per model, spinning off (module docstring), fed ``images`` ``[N, C, H, W]`` where given (see
    ``OrtRunner.feed_images``; else its seeded noise) and run ``warmup`` times on ``batch_size`` images: the runner
    makes and caches its batch there, outside any timing."""
    engines = {name: OrtRunner(path, threads=threads, provider=provider, spinning=False, seed=seed)
               for name, path in models.items()}
    for engine in engines.values():
        if images is not None:
            engine.feed_images(images)
        for _ in range(warmup):
            engine.run(batch_size)
    return engines


def interleaved_latency_ms(
    models: Mapping[str, Path],
    *,
    threads: int | None,
    warmup: int,
    iters: int,
    batch_size: int = 1,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
    images: Any | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Per model, ``iters`` latencies in ms of ``batch_size`` images (``images`` ``[N, C, H, W]`` where given, see
    ``OrtRunner.feed_images``; else seeded noise), runs interleaved across models (see the module docstring for the
    order and the untimed run before each timed one), on ``CLOCKS[clock]``.

    ``on_round`` is called after each of the ``iters`` rounds (one run of every model), e.g. to advance a progress bar.
    """
    engines = open_ort_runners(models, threads=threads, warmup=warmup, batch_size=batch_size, seed=seed, images=images)
    runners = {name: (lambda e=engine: e.run(batch_size)) for name, engine in engines.items()}
    return time_round_robin(runners, iters=iters, seed=seed, on_round=on_round, clock=clock)


def round_orders(names: Sequence[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order in which each round visits ``names``: a fresh permutation per round, reproducible from ``seed``."""
    rng = random.Random(seed)
    return [rng.sample(list(names), len(names)) for _ in range(rounds)]


def time_round_robin(
    runners: Mapping[str, Callable[[], object]],
    *,
    iters: int,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """``iters`` rounds; in each, every runner is called twice in a row (untimed, then timed), in ``round_orders``.
    Returns the timed calls' latencies in ms on ``CLOCKS[clock]`` (the wall clock, or the calling thread's CPU
    time, which a busy host does not inflate: ``profiling.timing.clock_threads``), per runner."""
    timer = CLOCKS[clock]
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for order in round_orders(list(runners), iters, seed):
        for name in order:  # one untimed call re-warms after whatever ran before
            samples[name].append(time_callable(runners[name], warmup=1, iters=1, budget_s=None, clock=timer)[0] * 1e3)
        if on_round is not None:
            on_round()
    return samples
