"""``tofu-export denoiser`` and ``tofu-export calibrate-denoiser``: dense ToFu for diffusion denoisers.

Both end like the other commands: one table of what was written and what it was checked against (or ``--json``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tofu_export.cli.groups import option_group
from tofu_export.cli.options import ExporterOption, JsonOption, OpsetOption
from tofu_export.cli.output import print_json, print_line, print_table
from tofu_export.names import DEFAULT_EXPORTER

Source = Annotated[str, typer.Argument(help="An OpenAI-UNet checkpoint folder (config.json + model.safetensors), or a "
                                            "diffusers save_pretrained folder (UNet2DConditionModel, UNet2DModel, "
                                            "DiT, PixArt).")]


@option_group("Denoiser")
class DenoiserOptions:
    config: Annotated[Path | None, typer.Option("--config", help="The UNet config, when SOURCE is a file.")] = None
    size: Annotated[int | None, typer.Option("--size", help="Sample side for a diffusers model (default: its "
                                             "sample_size).")] = None
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a diffusers folder whose only weights "
                                               "are pickled (diffusion_pytorch_model.bin; read with weights_only "
                                               "loading): a pickle can run code, so only for files you trust.")] = False

    def kwargs(self) -> dict[str, Any]:
        return {"config": self.config, "size": self.size, "trust_pickle": self.trust_pickle}


@option_group("Dense token reduction")
class DenseOptions:
    ratio: Annotated[float, typer.Option("--ratio", help="Fraction of each reduced block's tokens to reduce.")] = 0.5
    max_downsample: Annotated[int, typer.Option("--max-downsample", help="Reduce blocks up to this many times "
                                                "coarser.")] = 1
    seed: Annotated[int | None, typer.Option("--seed", help="Draw window destinations once from this seed.")] = None
    sublayers: Annotated[str, typer.Option("--sublayers", help="Reduce before these sub-layers of a block: self, "
                                           "cross, mlp (comma-separated).")] = "self"

    def kwargs(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "max_downsample": self.max_downsample, "seed": self.seed,
                "sublayers": self.sublayers.split(",")}

    def check(self, mode: str) -> None:
        """Refuse a bad ratio, mode, level or sub-layer before torch is loaded (``dense.plan``, torch-free)."""
        from tofu_export.dense.plan import check_uniform_plan

        check_uniform_plan(self.ratio, mode, self.max_downsample, self.sublayers)


@option_group("ONNX")
class DenoiserOnnxOptions:
    """The ViT export's ``--exporter`` and ``--opset`` flags; a denoiser step is exported at opset 17 by default."""

    exporter: ExporterOption = DEFAULT_EXPORTER
    opset: OpsetOption = 17


def denoiser(
    source: Source,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to write.")],
    model: DenoiserOptions,
    dense: DenseOptions,
    onnx: DenoiserOnnxOptions,
    mode: Annotated[str, typer.Option("--mode", help="prune, mean (ToMe for SD) or mlerp.")] = "mlerp",
    policy: Annotated[Path | None, typer.Option("--policy", help="A calibrate-denoiser policy file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an artifact folder tofu-export wrote.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Export one denoiser step with dense ToFu as a static-shape ONNX graph (parity and TensorRT checked).

    Example: tofu-export denoiser models/terrain_unet --ratio 0.5 --mode mlerp -o artifacts/terrain
    """
    dense.check(mode)
    from tofu_export.dense.job import export_denoiser_step

    done = export_denoiser_step(source, out, mode=mode, policy=policy, exporter=onnx.exporter, opset=onnx.opset,
                                force=force, **dense.kwargs(), **model.kwargs())
    if as_json:
        print_json({"folder": str(done.folder), "files": done.files, "model": done.kind,
                    "policy": json_policy(done.policy), **done.export.to_dict()})
        return
    print_table(Console(), export_table(done))


def calibrate_denoiser(
    source: Source,
    out: Annotated[Path, typer.Option("--out", "-o", help="Policy file to write.")],
    model: DenoiserOptions,
    dense: DenseOptions,
    onnx: DenoiserOnnxOptions,
    min_psnr: Annotated[float | None, typer.Option("--min-psnr", help="Stop reducing blocks below this.")] = None,
    speedup: Annotated[float | None, typer.Option("--speedup", help="Keep the step's predicted (FLOP) speed-up at "
                                                   "least this, e.g. 1.1; the choice is then also measured.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Samples (from fixed noise) to measure on.")] = 2,
    measure: Annotated[bool | None, typer.Option("--measure/--no-measure", help="Export the chosen policy's step and "
                                                 "the unreduced one (--exporter, --opset) and time them interleaved "
                                                 "on ONNX Runtime CPU [default: with --speedup].")] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved timing rounds, with --measure.")] = 20,
    clock: Annotated[str, typer.Option("--clock", help="wall, or thread-cpu (one ORT thread, the calling one: "
                                       "steadier on a busy machine).")] = "wall",
    as_json: JsonOption = False,
) -> None:
    """Choose each block's reduce mode by its damage to the final sample; write a policy for `denoiser --policy`.

    Example: tofu-export calibrate-denoiser models/terrain_unet --ratio 0.75 --min-psnr 35 -o terrain-policy.json
    """
    dense.check("mean")  # the modes are what calibration chooses
    from tofu_export.dense.plan import DensePolicy
    from tofu_export.profiling.timing import clock_threads

    clock_threads(clock, None)
    DensePolicy.check_output(out, [source])  # before torch is loaded
    from tofu_export.dense.job import calibrate_denoiser_policy

    result = calibrate_denoiser_policy(source, out, min_psnr=min_psnr, speedup=speedup, samples=samples,
                                       measure=measure, exporter=onnx.exporter, opset=onnx.opset, rounds=rounds,
                                       clock=clock, **dense.kwargs(), **model.kwargs())
    if as_json:
        print_json({"policy": str(out), "psnr": result.psnr, "ssim": result.ssim, **json_policy(result.policy)})
        return
    console = Console()
    print_table(console, calibration_table(source, out, result))
    if result.policy.notes.get("measured_below_budget"):
        print_line(console, f"note: the measured speed-up ({result.measured.speedup:.3f}x) is below the --speedup "
                   f"budget ({speedup:g}x) the FLOP prediction met: on this backend the reduction costs more than its "
                   "FLOPs say; raise --speedup or --ratio, or time on the target device")


def json_policy(policy: Any) -> dict[str, Any]:
    return {"blocks": {k: {"ratio": v.ratio, "mode": v.mode} for k, v in policy.blocks.items()},
            "sublayers": list(policy.sublayers), "notes": policy.notes}


def _modes(policy: Any) -> str:
    counts = Counter(f"{plan.mode} {plan.ratio:g}" for plan in policy.blocks.values())
    return ", ".join(f"{n} x {what}" for what, n in counts.items()) or "none"


def export_table(done: Any) -> Table:
    """What ``denoiser`` wrote and what it was checked against."""
    from tofu_export.reports.artifact import builds_on
    from tofu_export.tensorrt.targets import target_verdicts

    result, table = done.export, Table(title=f"exported a {done.kind} step to {done.folder}", show_header=False,
                                       title_justify="left")
    table.add_row("reduced blocks", f"{len(done.policy.blocks)}: {_modes(done.policy)} (before "
                  f"{', '.join(done.policy.sublayers)})")
    table.add_row("inputs", ", ".join(result.input_names) + f" -> {result.output_name} (batch dynamic)")
    p = result.parity
    table.add_row("parity (ORT vs PyTorch)", f"{'pass' if p.ok else 'FAIL'}: max |diff| {p.max_abs_diff:.2e} on "
                  f"outputs up to {p.output_scale:.3g}, min cosine {p.min_cosine:.7f}, batches "
                  f"{', '.join(map(str, p.batch_sizes))}" if p else "not checked")
    if result.tensorrt:
        verdicts = target_verdicts(result.tensorrt)
        failing = [v.label for v in verdicts if v.requested and not v.builds]
        table.add_row("TensorRT static check", f"builds on {builds_on(verdicts)} (opset {result.opset}, "
                      f"{result.exporter})" + (f"; FAIL for {', '.join(failing)}" if failing else ""))
    table.add_row("graph", f"{sum(result.op_counts.values())} nodes, TopK {result.op_counts.get('TopK', 0)}")
    notes = done.policy.notes
    if "calibration_psnr" in notes:  # a calibrated policy: what its calibration measured
        ssim = f", SSIM {notes['ssim']:.4f}" if "ssim" in notes else ""
        table.add_row("calibration: final samples", f"PSNR {notes['calibration_psnr']:.2f} dB{ssim} vs unreduced")
    if notes.get("predicted_speedup") is not None:
        m = notes.get("measured")
        measured = (f", measured {m['speedup']:.3f}x ({m['speedup_iqr'][0]:.3f}-{m['speedup_iqr'][1]:.3f}x, "
                    f"{m['rounds']} rounds, {m['clock']} clock, load {m['load_average'][0]:.1f})" if m else "")
        table.add_row("calibration: speed-up", f"predicted {notes['predicted_speedup']:.3f}x{measured}")
    table.add_row("files", ", ".join(done.files))
    return table


def calibration_table(source: str, out: Path, result: Any) -> Table:
    """What ``calibrate-denoiser`` chose, how close its samples stay, and how much faster it is."""
    notes, policy = result.policy.notes, result.policy
    table = Table(title=f"{source}: per-block modes, written to {out} ({notes['seconds']:.0f} s)", show_header=False,
                  title_justify="left")
    table.add_row("reduced blocks", f"{len(policy.blocks)}: {_modes(policy)}")
    for name, plan in policy.blocks.items():
        table.add_row(f"  {name}", plan.mode)
    table.add_row("final samples vs unreduced", f"PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f} "
                  f"({notes['samples']} samples: {notes['sampler']})")
    budget = [f"PSNR >= {notes['min_psnr']:g} dB"] if notes.get("min_psnr") is not None else []
    budget += [f"predicted speed-up >= {notes['speedup_budget']:g}x"] if notes.get("speedup_budget") else []
    table.add_row("budget", ", ".join(budget) or "none (best modes at this ratio)")
    if notes.get("predicted_speedup") is not None:
        table.add_row("speed-up, predicted", f"{notes['predicted_speedup']:.3f}x (FLOPs, blocks summed)")
    m = result.measured
    if m is not None:
        low, high = m.speedup_iqr
        base, mine = m.baseline, m.policy
        table.add_row("speed-up, measured", f"{m.speedup:.3f}x (per-round quartiles {low:.3f}-{high:.3f}x; "
                      f"{m.rounds} interleaved rounds, {m.clock} clock, load {m.load_average[0]:.1f}-"
                      f"{m.load_average[1]:.1f})")
        table.add_row("step latency p50 (p10-p90)", f"unreduced {base['p50_ms']:.2f} ms ({base['p10_ms']:.2f}-"
                      f"{base['p90_ms']:.2f}), policy {mine['p50_ms']:.2f} ms ({mine['p10_ms']:.2f}-"
                      f"{mine['p90_ms']:.2f}); {m.backend}, batch 1, {m.exporter}, opset {m.opset}")
        tome = notes.get("tome_for_sd")
        if tome:
            t = m.compared["tome"]
            table.add_row("ToMe for SD (mean, same ratio)", f"PSNR {tome['psnr']:.2f} dB, measured speed-up "
                          f"{t['speedup']:.3f}x ({t['speedup_iqr'][0]:.3f}-{t['speedup_iqr'][1]:.3f}x), same rounds")
            table.add_row("policy vs ToMe for SD", f"{result.psnr - tome['psnr']:+.2f} dB, latency ratio "
                          f"{t['speedup'] / m.speedup:.3f} (policy / ToMe, medians)")
    table.add_row("sampling runs", str(notes["runs"]))
    return table
