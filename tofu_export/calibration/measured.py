"""What a calibration promises, measured: the chosen policy's speed-up on its exported graph, and its fidelity on
images the search never saw.

- ``split_held_out``: the images are split once, before anything is measured; the search (trace, damage, the
  candidates' forwards) sees only its part; the held-out part is used once, on the final choice.
- ``measure_policy_latency``: the unreduced model and the policy are exported with the settings the user ships
  (``exporters.onnx.export_onnx``: exporter, opset, simplification; parity off, the graphs are not the artifact;
  side by side in forked workers, one per core, ``exporters.workers``; the policy graph then held to the export's
  parity gate here), opened through the engine runner (``engines.ort.OrtRunner``) and timed round-robin in one process
  (``profiling.compare.time_round_robin``: a shuffled order, on the wall clock or on the calling thread's CPU clock,
  which a busy host does not inflate; ORT then runs on one intra-op thread, the calling one); the speed-up is the
  median of the per-round ratios, so load that hits both in a round cancels. ToMe graphs at the uniform r values
  asked for are timed in the same rounds, so the policy is compared with ToMe at its own measured latency.
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tofu_export.calibration.latency_model import interpolate_linear
from tofu_export.exporters.onnx import export_onnx
from tofu_export.exporters.parity import parity_advice, verify_parity
from tofu_export.exporters.workers import export_workers, run_jobs, weight_bytes
from tofu_export.models.family import family_of, patched, unpatched
from tofu_export.names import DEFAULT_EXPORTER, DEFAULT_SIMPLIFIER
from tofu_export.profiling.timing import clock_threads, per_round_speedup, speedup_iqr
from tofu_export.schedule import plan_tokens


@dataclass(frozen=True)
class ExportSettings:
    """How the user's graphs are exported (what the latency is measured on)."""

    exporter: str = DEFAULT_EXPORTER
    opset: int = 17
    simplify: bool = True
    simplifier: str = DEFAULT_SIMPLIFIER
    tolerance: float = 1e-4  # the parity gate's, as `export --policy --tolerance` will hold the policy graph to it
    workers: int | None = None  # forked workers the timed graphs are exported in (None: one per core memory allows)

    def export(self, module: nn.Module, path: Path, size: tuple[int, int], **extra: Any) -> None:
        """``module`` exported to ``path`` as these settings say, without the parity check (the caller verifies
        what it ships); ``extra``: more ``export_onnx`` arguments (an ``example`` input)."""
        export_onnx(module, path, size, opset=self.opset, simplify=self.simplify, verify=False,
                    exporter=self.exporter, simplifier=self.simplifier, **extra)  # type: ignore[arg-type]

    def workers_for(self, jobs: int, model: nn.Module) -> int:
        """How many forked workers ``jobs`` exports of ``model`` run in (``exporters.workers.run_jobs``):
        ``workers`` where set, else one per usable core, as far as the available memory holds their exports."""
        if self.workers is not None:
            return max(1, self.workers)
        return export_workers(jobs, weight_bytes(model))


def split_held_out(images: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """``images [B, 3, H, W]`` -> (search, held-out): every ``round(1 / fraction)``-th image is held out (an even
    spread over the set); ``fraction`` 0 holds out nothing."""
    if fraction <= 0:
        return images, images[:0]
    step = max(2, round(1 / fraction))
    held = torch.zeros(len(images), dtype=torch.bool)
    held[step - 1 :: step] = True
    return images[~held], images[held]


@dataclass(frozen=True)
class PolicyLatency:
    """The policy's exported graph against the unreduced one, timed interleaved (ms, batch 1)."""

    baseline_ms: float  # median over rounds
    policy_ms: float
    speedup: float  # median over rounds of baseline / policy in the same round
    speedup_iqr: tuple[float, float]  # quartiles of the per-round ratio
    rounds: int
    backend: str
    exporter: str
    opset: int
    clock: str = "wall"
    tome_speedup: dict[int, float] = field(default_factory=dict)  # uniform r -> median per-round speed-up
    export_parity: dict = field(default_factory=dict)  # the policy graph against PyTorch: export's gate (ok, ...)

    def to_dict(self) -> dict:
        return dict(asdict(self), speedup_iqr=list(self.speedup_iqr),  # JSON has no tuples, no int keys
                    tome_speedup={str(k): v for k, v in self.tome_speedup.items()})


def measure_policy_latency(
    model: nn.Module,
    modes: Sequence[str],
    r: Sequence[int],
    *,
    prop_attn: bool = True,
    settings: ExportSettings | None = None,
    provider: str = "cpu",
    threads: int | None = None,
    rounds: int = 20,
    clock: str = "wall",
    tome_r: Sequence[int] = (),
    image: Tensor | None = None,
    on_step: Callable[[], None] | None = None,
    on_timing: Callable[[], None] | None = None,
) -> PolicyLatency:
    """Export the unreduced model, the policy ``(modes, r)`` and ToMe at each uniform r of ``tome_r`` as the user
    would, and time them interleaved on ``clock`` (module docstring), each run on ``image [1, 3, H, W]`` (None: the
    runner's seeded noise, which can cost a reduced graph more than the unreduced one: on an Intel Xeon VM DINOv2's
    ToMe r=16 measured 1.46x on noise and 1.49x on a real image, ``bench/results/latency_prediction.md``);
    ``on_step`` after each export and round, ``on_timing`` once between the two. ``model`` is left as it was."""
    from tofu_export.profiling.compare import open_ort_runners, time_round_robin

    step = on_step or (lambda: None)
    threads = clock_threads(clock, threads)
    settings = settings or ExportSettings()
    family = family_of(model)
    size = family.img_size(model)
    depth, tokens0, prefix = family.depth(model), family.num_tokens(model), family.num_prefix(model)
    variants = {"policy": (list(modes), list(r))}
    variants |= {f"tome-r{k}": (["mean"] * depth, plan_tokens(tokens0, prefix, [k] * depth, warn=False).r)
                 for k in tome_r}
    with tempfile.TemporaryDirectory(prefix="tofu-calibrate-") as tmp:
        paths = {name: Path(tmp) / f"{name}.onnx" for name in ("baseline", *variants)}
        jobs = [partial(_export_variant, model, settings, paths[name], size, variants.get(name), prop_attn)
                for name in paths]
        with unpatched(model):
            run_jobs(jobs, settings.workers_for(len(jobs), model), on_done=step)  # side by side where cores allow
            with warnings.catch_warnings(), patched(model, r=list(r), mode=list(modes), prop_attn=prop_attn,
                                                    img_size=size):
                warnings.simplefilter("ignore")
                # the gate `tofu-export export --policy` will hold the graph to
                gate = verify_parity(model, paths["policy"], size, tolerance=settings.tolerance)
        runners = open_ort_runners(paths, threads=threads, warmup=1, provider=provider,
                                   images=None if image is None else image[:1])
        if on_timing is not None:
            on_timing()
        samples = time_round_robin({name: (lambda x=runner: x.run(1)) for name, runner in runners.items()},
                                   iters=rounds, clock=clock, on_round=on_step)

    speedup, iqr = speedup_iqr(samples["baseline"], samples["policy"])
    tome = {k: per_round_speedup(samples["baseline"], samples[f"tome-r{k}"])[1] for k in tome_r}
    parity = {"ok": gate.ok, "min_cosine": gate.min_cosine, "images_within_tolerance": gate.images_within_tolerance,
              "advice": None if gate.ok else parity_advice(gate)}
    return PolicyLatency(statistics.median(samples["baseline"]), statistics.median(samples["policy"]), speedup,
                         iqr, rounds, f"onnxruntime-{provider}", settings.exporter, settings.opset, clock, tome,
                         parity)


def _export_variant(model: nn.Module, settings: ExportSettings, path: Path, size: tuple[int, int],
                    variant: tuple[list[str], list[int]] | None, prop_attn: bool) -> None:
    """One graph ``measure_policy_latency`` times: the plain ``model`` (``variant`` None) or ``model`` patched with
    ``(modes, r)``, exported to ``path``; the model is left as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant is None:
            settings.export(model, path, size)
            return
        modes, r = variant
        with patched(model, r=r, mode=modes, prop_attn=prop_attn, img_size=size):
            settings.export(model, path, size)


def tome_bracket(predict_ms: Callable[[int], float], target_ms: float, limit: int, width: int) -> tuple[int, ...]:
    """Uniform r values spanning ``width`` (within ``[1, limit]``) around the one whose predicted latency
    (``predict_ms(r)``) is nearest ``target_ms``: both ends and the middle. ToMe is timed at each and interpolated
    at the policy's latency between the two nearest (``at_speedup``). The middle point is there because ToMe's
    cosine is concave in its speed-up: a line between the ends alone runs below the curve and flatters what is
    compared with it (on DINOv2-S/14 at 1.5x, r=15 measured 0.0001 above the line from r=14 to r=16)."""
    nearest = min(range(1, limit + 1), key=lambda k: abs(predict_ms(k) - target_ms))
    hi = min(limit, max(nearest - width // 2, 1) + width)
    lo = max(1, hi - width)
    return tuple(sorted({lo, (lo + hi) // 2, hi}))


def at_speedup(speedups: Sequence[float], values: Sequence[float], speedup: float) -> tuple[float, bool]:
    """``values`` (one per measured ``speedups``) at ``speedup``: on the line between the two measured points
    nearest around it (beyond either end, the end segment's line); and whether that was an extrapolation
    (``speedup`` outside the measured ones)."""
    order = sorted(range(len(speedups)), key=lambda i: speedups[i])  # timing noise may reorder the r
    xs, ys = [speedups[i] for i in order], [values[i] for i in order]
    return interpolate_linear(xs, ys, speedup), not xs[0] <= speedup <= xs[-1]
