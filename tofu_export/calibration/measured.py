"""What a calibration promises, measured: the chosen policy's speed-up on its exported graph, and its fidelity on
images the search never saw.

- ``split_held_out``: the images are split once, before anything is measured; the search (trace, damage, the
  verification that rescales predictions) sees only its part; the held-out part is used once, on the final choice.
- ``measure_policy_latency``: the unreduced model and the policy are exported with the settings the user ships
  (``exporters.onnx.export_onnx``: exporter, opset, simplification; parity off, the graphs are not the artifact),
  opened through the engine runner (``engines.ort.OrtRunner``) and timed round-robin in one process
  (``profiling.compare.time_round_robin``); the speed-up is the median of the per-round ratios, so load that hits
  both in a round cancels.
"""

from __future__ import annotations

import statistics
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tofu_export.calibration.damage import cosine_to, run_from_block
from tofu_export.exporters.onnx import DEFAULT_EXPORTER, export_onnx
from tofu_export.models.family import family_of, patched, unpatched


@dataclass(frozen=True)
class ExportSettings:
    """How the user's graphs are exported (what the latency is measured on)."""

    exporter: str = DEFAULT_EXPORTER
    opset: int = 17
    simplify: bool = True


def split_held_out(images: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """``images [B, 3, H, W]`` -> (search, held-out): every ``round(1 / fraction)``-th image is held out (an even
    spread over the set); ``fraction`` 0 holds out nothing."""
    if fraction <= 0:
        return images, images[:0]
    step = max(2, round(1 / fraction))
    held = torch.zeros(len(images), dtype=torch.bool)
    held[step - 1 :: step] = True
    return images[~held], images[held]


def held_out_cosine(
    model: nn.Module, images: Tensor, modes: Sequence[str], r: Sequence[int], prop_attn: bool
) -> float | None:
    """Mean cosine of the pooled output of ``model`` patched with the policy to the unreduced model's, on
    ``images`` (``model`` is left as it was); None for no images."""
    if len(images) == 0:
        return None
    family = family_of(model)
    with torch.no_grad(), unpatched(model):
        x0 = torch.cat([family.embed(model, chunk) for chunk in images.split(32)])  # [B, N, C]
        reference = run_from_block(model, x0, 0)
        with patched(model, r=list(r), mode=list(modes), prop_attn=prop_attn):
            output = run_from_block(model, x0, 0)
    return float(cosine_to(reference, output).mean())


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

    def to_dict(self) -> dict:
        return dict(asdict(self), speedup_iqr=list(self.speedup_iqr))  # JSON has no tuples


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
) -> PolicyLatency:
    """Export the unreduced model and the policy ``(modes, r)`` as the user would, and time both interleaved
    (module docstring). ``model`` is left as it was."""
    from tofu_export.engines.ort import OrtRunner
    from tofu_export.profiling.compare import time_round_robin

    settings = settings or ExportSettings()
    size = family_of(model).img_size(model)
    with tempfile.TemporaryDirectory(prefix="tofu-calibrate-") as tmp:
        paths = {"baseline": Path(tmp) / "baseline.onnx", "policy": Path(tmp) / "policy.onnx"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with unpatched(model):
                _export(model, paths["baseline"], size, settings)
                with patched(model, r=list(r), mode=list(modes), prop_attn=prop_attn, img_size=size):
                    _export(model, paths["policy"], size, settings)
        runners = {name: OrtRunner(path, threads=threads, provider=provider, spinning=False)
                   for name, path in paths.items()}
        for runner in runners.values():
            runner.run(1)  # warm-up outside the timing
        samples = time_round_robin({name: (lambda x=runner: x.run(1)) for name, runner in runners.items()},
                                   iters=rounds, seed=0)
    ratios = [b / p for b, p in zip(samples["baseline"], samples["policy"], strict=True)]
    q1, mid, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return PolicyLatency(statistics.median(samples["baseline"]), statistics.median(samples["policy"]), mid,
                         (q1, q3), rounds, f"onnxruntime-{provider}", settings.exporter, settings.opset)


def _export(model: nn.Module, path: Path, size: tuple[int, int], settings: ExportSettings) -> None:
    export_onnx(model, path, size, opset=settings.opset, simplify=settings.simplify, verify=False,
                exporter=settings.exporter)  # type: ignore[arg-type]
