"""The library functions behind ``tofu-export denoiser`` and ``tofu-export calibrate-denoiser``.

A source is whatever a denoiser family recognises (``models.denoiser_family``: an OpenAI-UNet checkpoint folder or
file with its config, a diffusers ``save_pretrained`` folder); this module knows no model, only that interface:
``open_denoiser`` loads it and reads its token grids, ``export_denoiser_step`` patches and exports one step,
``calibrate_denoiser_policy`` chooses per-block modes on the family's final samples from fixed noise and, with
``measure``, times the chosen policy's exported step against the unreduced one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tofu_export.dense.calibrate import Calibration, calibrate_denoiser
from tofu_export.dense.export import DenoiserExport, export_denoiser
from tofu_export.dense.plan import BlockPlan, DensePolicy, check_sublayers, plan_blocks
from tofu_export.errors import Hint, UserError
from tofu_export.models.denoiser_family import LoadedDenoiser, Sampler, load_denoiser_source
from tofu_export.names import DEFAULT_EXPORTER, ReduceMode
from tofu_export.profiling.timing import clock_threads
from tofu_export.progress import tracker


@dataclass
class OpenedDenoiser:
    """A loaded denoiser and its blocks' token grids: ``step`` is what is exported, ``patch`` applies a policy."""

    loaded: LoadedDenoiser
    grids: dict[str, tuple[int, int]]

    @property
    def step(self) -> nn.Module:
        return self.loaded.family.step(self.loaded.model)

    @property
    def input_names(self) -> list[str]:
        return self.loaded.family.input_names(self.loaded.model)

    def make_inputs(self, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return self.loaded.make_inputs()(batch, seed)

    def patch(self, policy: DensePolicy) -> nn.Module:
        return self.loaded.family.patch(self.loaded.model, policy, self.grids)

    def sampler(self, samples: int, seed: int) -> Sampler:
        return self.loaded.family.sampler(self.loaded.model, self.loaded.size, samples, seed)


def load_denoiser(source: str | Path, config: str | Path | None = None, trust_pickle: bool = False,
                  size: int | None = None) -> LoadedDenoiser:
    """The denoiser at ``source`` through the family that recognises it; ``UserError`` for anything unreadable."""
    return load_denoiser_source(source, config=config, trust_pickle=trust_pickle, size=size)


def open_denoiser(source: str | Path, config: str | Path | None = None, trust_pickle: bool = False,
                  size: int | None = None) -> OpenedDenoiser:
    """``load_denoiser`` and the token grids of its reducible blocks (``size``: the sample side, default the
    model's own)."""
    loaded = load_denoiser(source, config, trust_pickle, size)
    return OpenedDenoiser(loaded, loaded.family.grids(loaded.model, loaded.make_inputs()(1, 0)))


@dataclass
class ExportedDenoiser:
    """What ``export_denoiser_step`` wrote: the folder, its files, the export's checks and the policy."""

    folder: Path
    files: list[str]
    export: DenoiserExport
    policy: DensePolicy
    kind: str


def export_denoiser_step(source: str | Path, out: str | Path, *, ratio: float = 0.5, mode: ReduceMode = "mlerp",
                         max_downsample: int = 1, stride: int = 2, seed: int | None = None,
                         policy: str | Path | None = None, config: str | Path | None = None, opset: int = 17,
                         exporter: str = DEFAULT_EXPORTER, force: bool = False, sublayers: Sequence[str] = ("self",),
                         trust_pickle: bool = False, size: int | None = None) -> ExportedDenoiser:
    """Patch the denoiser (``policy`` file, or one ``ratio`` / ``mode`` for the levels ``max_downsample`` allows,
    before ``sublayers``) and write ``out/model.onnx`` + ``out/policy.json`` + ``out/export.json``, all or nothing."""
    from tofu_export.artifacts import staged_folder

    check_sublayers(sublayers)
    opened = open_denoiser(source, config, trust_pickle, size)
    plan = (DensePolicy.load(policy) if policy else
            plan_blocks(opened.grids, ratio, mode, max_downsample, stride, seed, sublayers))
    opened.patch(plan)
    with staged_folder(Path(out), force=force) as folder:
        result = export_denoiser(opened.step, folder / "model.onnx", opened.make_inputs, opened.input_names,
                                 opset=opset, exporter=exporter)
        plan.save(folder / "policy.json")
        record = result.to_dict()
        record["path"] = "model.onnx"
        (folder / "export.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        files = sorted(p.name for p in folder.iterdir())
        files.append(_write_manifest(folder, files))
    result.path = Path(out) / "model.onnx"
    return ExportedDenoiser(Path(out), files, result, plan, opened.loaded.kind)


def _write_manifest(folder: Path, files: Sequence[str]) -> str:
    """A tofu-export ``manifest.json`` naming the folder's files (with their sha256), so that a later export with
    ``force`` may replace this folder, and only while it holds nothing else (``artifacts.check_output``). It is not
    a ViT artifact's manifest: readers of those refuse it (``ManifestError``)."""
    from tofu_export.hashing import sha256_file
    from tofu_export.manifest import MANIFEST, TOOL

    entries = [{"name": name, "sha256": sha256_file(folder / name)} for name in files]
    (folder / MANIFEST).write_text(json.dumps({"tool": TOOL, "kind": "denoiser-step", "files": entries}, indent=2)
                                   + "\n")
    return MANIFEST


def flop_cost(model: nn.Module, patch: Callable[[DensePolicy], object], inputs: Sequence[torch.Tensor]):
    """``cost(policy)``: the predicted cost of one step under ``policy``, in FLOPs (torch's ``FlopCounterMode`` on
    one sample): the unreduced step's, less each reduced block's own saving (measured once per block and ratio,
    summed: blocks are assumed independent)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = [t[:1] for t in inputs]

    def count(policy: DensePolicy) -> float:
        patch(policy)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*one)
        return float(counter.get_total_flops())

    base = count(DensePolicy({}))
    savings: dict[tuple[str, float], float] = {}

    def cost(policy: DensePolicy) -> float:
        for name, plan in policy.blocks.items():
            if (name, plan.ratio) not in savings:
                savings[name, plan.ratio] = base - count(DensePolicy({name: plan}, policy.stride, policy.seed,
                                                                     sublayers=policy.sublayers))
        return base - sum(savings[name, plan.ratio] for name, plan in policy.blocks.items())

    return cost


def calibrate_denoiser_policy(source: str | Path, out: str | Path, *, ratio: float = 0.5,
                              min_psnr: float | None = None, speedup: float | None = None, samples: int = 2,
                              max_downsample: int = 1, stride: int = 2, seed: int | None = None, noise_seed: int = 1,
                              config: str | Path | None = None, trust_pickle: bool = False, size: int | None = None,
                              sublayers: Sequence[str] = ("self",), measure: bool | None = None,
                              exporter: str = DEFAULT_EXPORTER, opset: int = 17, rounds: int = 20,
                              clock: str = "wall") -> Calibration:
    """Calibrate a denoiser's per-block modes on the final samples of its family's sampler from fixed noise
    (``noise_seed``) and write the policy file ``out``. ``speedup``: a budget on the predicted (FLOP) speed-up of
    the step. ``measure`` (default: when ``speedup`` is given) exports the chosen policy's step and the unreduced
    one (``exporter``, ``opset``) and times them interleaved, with ToMe for SD (mean in every candidate block at
    ``ratio``) in the same rounds; the measured speed-ups are recorded beside the predicted one."""
    started, out = time.perf_counter(), Path(out)
    DensePolicy.check_output(out, [p for p in (source, config) if p is not None])
    if samples < 1:
        raise UserError(f"samples must be at least 1, got {samples}", hint=Hint("samples", "2"))
    if rounds < 1:
        raise UserError(f"rounds must be at least 1, got {rounds}", hint=Hint("rounds", "20"))
    sublayers = check_sublayers(sublayers)
    measure = speedup is not None if measure is None else measure
    clock_threads(clock, None)  # an unknown clock is refused before the sampling, measured or not
    opened = open_denoiser(source, config, trust_pickle, size)
    final = opened.sampler(samples, noise_seed)

    blocks = list(plan_blocks(opened.grids, ratio, "mean", max_downsample, stride, seed, sublayers).blocks)
    wants_cost = speedup is not None or measure
    cost = flop_cost(opened.step, opened.patch, opened.make_inputs(1, 0)) if wants_cost else None
    # every trial is a full sampling run (minutes on a CPU for a real UNet): counted, as their number depends on
    # what the trials find
    with tracker(f"denoiser calibration: sampling runs of {samples} samples, {len(blocks)} blocks", 0,
                 announce=True) as bar:  # said at once, not after the first (the reference's) run

        def run(policy: DensePolicy) -> torch.Tensor:
            opened.patch(policy)
            samples_out = final()
            bar.advance()
            return samples_out

        result = calibrate_denoiser(run, blocks, ratio, min_psnr=min_psnr, speedup=speedup, cost=cost,
                                    stride=stride, seed=seed, sublayers=sublayers)
    family = opened.loaded.family
    result.policy.notes |= {"family": family.name, "model": opened.loaded.kind, "samples": samples,
                            "noise_seed": noise_seed, "sampler": family.sampler_text(opened.loaded.model),
                            "ssim": result.ssim}
    if cost is not None and "predicted_speedup" not in result.policy.notes:
        result.policy.notes["predicted_speedup"] = cost(DensePolicy({}, stride, seed)) / cost(result.policy)
    if measure:
        from tofu_export.dense.measured import measure_step_latency

        tome = DensePolicy({b: BlockPlan(ratio, "mean") for b in blocks}, stride, seed, sublayers=sublayers)
        result.measured = measure_step_latency(opened.step, opened.patch, result.policy, opened.make_inputs,
                                               opened.input_names, exporter=exporter, opset=opset, rounds=rounds,
                                               clock=clock, compare={"tome": tome})
        result.policy.notes |= {"measured_speedup": result.measured.speedup, "measured": result.measured.to_dict()}
        tome_psnr = next(e["psnr"] for e in result.log if e["step"] == "uniform mean")
        result.policy.notes["tome_for_sd"] = {"ratio": ratio, "psnr": tome_psnr,
                                              "measured_speedup": result.measured.compared["tome"]["speedup"]}
        if speedup is not None and result.measured.speedup < speedup:
            result.policy.notes["measured_below_budget"] = True  # said, not hidden: FLOPs over-predicted here
    result.policy.notes["seconds"] = round(time.perf_counter() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.policy.save(out)
    return result
