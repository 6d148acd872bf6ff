"""The quick look: baseline (r = 0) vs ToFu, on this machine's CPU, from one short interleaved run.

It answers what an export bought and what it cost, in a few seconds, as a first figure and not a benchmark:

- latency: both graphs run on ONNX Runtime's CPU provider, batch 1 (the first image where images are at hand, else
  seeded noise: a graph's time can depend on its input's values), round-robin in one process in a fresh random
  order every round, each timed run right after an untimed one (``profiling.compare.time_round_robin``), so a slow
  spell of a shared machine hits both alike. Per model the median and the 10th-90th percentile of the rounds; the
  speed-up is the median of the per-round ratios (a slow spell cancels within its round), with their 10th-90th
  percentile, as the sweep's and the calibration's speed-ups are;
- fidelity, where images are at hand: cosine similarity of every image's ToFu output to the unreduced model's, and
  for classifiers the share of images whose top-1 class is unchanged.

The baseline is the same model patched with r = 0 and exported the same way, so the two graphs differ only in the
token reduction (an r = 0 graph computes exactly what the unpatched model does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tofu_export.engines.base import NOISE
from tofu_export.errors import Hint
from tofu_export.images import ImageError, decode_images, evenly_spaced, find_images

LABEL = "quick look on this machine, not a benchmark"


class QuickLookDataError(ImageError):
    """The images given for the quick look cannot be found or read."""


@dataclass(frozen=True)
class QuickLookSettings:
    """How long to time, and which images to measure fidelity on."""

    data: Path | None = None  # a folder of images (flat or in class folders); None: latency only
    pattern: str = "*"  # file-name pattern within ``data`` (e.g. "imagenet_*")
    max_images: int = 32  # evenly spread over the sorted files
    data_name: str | None = None  # how the report names the images ("20 ImageNet samples from foolbox")
    budget_s: float = 6.0  # timing budget for the rounds, both models together
    min_rounds: int = 7
    max_rounds: int = 200
    threads: int | None = None  # ORT intra-op threads; None: ORT's default (all cores)
    timing: bool = True  # False: fidelity only (a target this machine cannot time)
    seed: int = 0


def image_files(root: Path, pattern: str = "*", limit: int | None = None) -> list[Path]:
    """Image files under ``root`` (any depth) whose name matches ``pattern``, sorted, at most ``limit`` spread evenly
    over the list (so class folders stay balanced)."""
    return evenly_spaced(find_images(root, pattern, error=QuickLookDataError), limit)


def load_images(files: Sequence[Path], transform: Any) -> torch.Tensor:
    """``[N, 3, H, W]``: each file decoded as RGB and passed through ``transform`` (the model's eval transform)."""
    return decode_images(list(files), transform, QuickLookDataError, Hint("data"))


def spread(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile, min and max, in ms (``profiling.timing.LatencyStats``)."""
    from tofu_export.profiling.timing import LatencyStats

    stats = LatencyStats.from_ms(samples_ms)
    return {"p50_ms": stats.p50_ms, "p10_ms": stats.p10_ms, "p90_ms": stats.p90_ms, "min_ms": stats.min_ms,
            "max_ms": stats.max_ms, "rounds": stats.n}


def compare_latency(baseline_ms: Sequence[float], tofu_ms: Sequence[float]) -> dict[str, Any]:
    """Both models' spread and the speed-up: the median and the 10th-90th percentile of the per-round ratios (round
    ``i`` ran both models once, close in time), so the figure always lies inside its own range."""
    from tofu_export.profiling.timing import per_round_speedup

    low, mid, high = per_round_speedup(baseline_ms, tofu_ms)
    return {"baseline": spread(baseline_ms), "tofu": spread(tofu_ms), "speedup": mid,
            "speedup_per_round": {"p10": low, "p90": high}}


def rounds_for(budget_s: float, round_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many rounds fit ``budget_s`` when one round (every model twice) takes ``round_s``."""
    return int(min(max_rounds, max(min_rounds, budget_s // max(round_s, 1e-6))))


def time_models(baseline: Path, tofu: Path, settings: QuickLookSettings,
                image: torch.Tensor | None = None) -> dict[str, Any]:
    """Interleaved batch-1 latency of the two ONNX graphs on ONNX Runtime's CPU provider (spinning off), on
    ``image`` ``[1, 3, H, W]`` where given, else on seeded noise."""
    from tofu_export.profiling.compare import open_ort_runners, time_round_robin
    from tofu_export.profiling.device import load_average
    from tofu_export.profiling.timing import time_callable

    runners = open_ort_runners({"baseline": baseline, "tofu": tofu}, threads=settings.threads, warmup=0,
                               seed=settings.seed, images=image)
    calls = {name: (lambda r=runner: r.run(1)) for name, runner in runners.items()}
    warm = {name: min(time_callable(call, warmup=1, iters=2, budget_s=None)) for name, call in calls.items()}
    rounds = rounds_for(settings.budget_s, 2 * sum(warm.values()), settings.min_rounds, settings.max_rounds)
    samples = time_round_robin(calls, iters=rounds, seed=settings.seed)
    return {**compare_latency(samples["baseline"], samples["tofu"]), "batch": 1,
            "provider": "CPUExecutionProvider", "threads": settings.threads, "order": "shuffled round-robin",
            "load": load_average(), "timed_on": NOISE if image is None else "the first image"}



def fidelity(baseline: Path, tofu: Path, images: torch.Tensor, classifier: bool) -> dict[str, Any]:
    """How close the ToFu graph's outputs stay to the baseline's on ``images`` ``[N, 3, H, W]``: per-image cosine
    (mean, min) and, for classifiers, top-1 agreement."""
    from tofu_export.engines.ort import OrtRunner
    from tofu_export.evaluation.metrics import feature_cosine

    reference = OrtRunner(baseline)(images).reshape(len(images), -1)  # [N, D]
    reduced = OrtRunner(tofu)(images).reshape(len(images), -1)  # [N, D]
    cosine = feature_cosine(reference, reduced)
    agreement = float((reference.argmax(1) == reduced.argmax(1)).double().mean()) if classifier else None
    return {"images": len(images), "cosine_mean": cosine["mean"], "cosine_min": cosine["min"],
            "top1_agreement": agreement}


def machine() -> dict[str, Any]:
    """The CPU the figures were taken on, and its vector extensions (``profiling.device.SIMD_FLAGS``)."""
    from tofu_export.profiling.device import describe_device

    device = describe_device()
    return {"cpu": device.cpu_model, "cores": device.cpu_cores, "cpu_features": device.cpu_features}


def is_classifier(model: torch.nn.Module) -> bool:
    """A model with a class head (timm's ``num_classes`` > 1), whose top-1 class is meaningful."""
    return int(getattr(model, "num_classes", 0) or 0) > 1


def export_baseline(model: torch.nn.Module, path: Path, img_size: int, **onnx_settings: Any) -> Any:
    """``model`` (unreduced; patched here with r = 0) exported to ``path`` as the ToFu graph was (``onnx_settings``:
    ``export_onnx``'s opset, simplify, tolerance, exporter); its parity to PyTorch is verified like any export."""
    from tofu_export.config import ToFuConfig
    from tofu_export.exporters.onnx import export_onnx

    ToFuConfig(r=0, img_size=img_size).patch(model)
    return export_onnx(model, path, img_size, **onnx_settings)


def run_quick_look(
    model: torch.nn.Module,
    tofu_onnx: Path,
    img_size: int,
    settings: QuickLookSettings,
    *,
    gflops: dict[str, float],
    onnx_settings: dict[str, Any],
    images: torch.Tensor | None = None,
    step: Any = lambda _: None,
    exported: Any = None,
) -> dict[str, Any]:
    """Export the unreduced ``model`` the way ``tofu_onnx`` was (unless ``exported``: its ``export_baseline``, done
    already), then time both and compare their outputs on ``images`` ``[N, 3, H, W]`` (if any). Returns the
    manifest's ``quick_look`` section."""
    import tempfile

    classifier = is_classifier(model)
    result: dict[str, Any] = {"label": LABEL, "machine": machine(),
                              "gflops": {"baseline": gflops["original"], "tofu": gflops["tofu"]}}
    with tempfile.TemporaryDirectory(prefix="tofu-quick-look-") as tmp:
        baseline = exported
        if baseline is None:
            step("quick look: exporting the unreduced model (r=0) the same way")
            baseline = export_baseline(model, Path(tmp) / "baseline.onnx", img_size, **onnx_settings)
        parity = baseline.parity
        result["baseline"] = {"r": 0, "parity_max_abs_diff": None if parity is None else parity.max_abs_diff}
        if settings.timing:
            step(f"quick look: timing baseline vs ToFu, interleaved (~{settings.budget_s:.0f} s)")
            result["latency"] = time_models(baseline.path, tofu_onnx, settings,
                                            None if images is None else images[:1])
        if images is not None:
            step(f"quick look: outputs of {len(images)} images, ToFu vs baseline")
            result["fidelity"] = {**fidelity(baseline.path, tofu_onnx, images, classifier),
                                  "data": str(settings.data), "name": settings.data_name}
    return result
