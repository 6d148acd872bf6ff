"""``tofu-export calibrate CHECKPOINT DATA``: measure per-block modes and r on your images; write policy.json."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tofu_export.cli.options import JsonOption, ModelOptions, OnnxOptions, RuntimeOptions
from tofu_export.cli.output import print_json
from tofu_export.errors import Hint, UserError


def _check_replaceable(path: Path) -> None:
    """``path`` may be written: it does not exist, or it is a policy tofu-export wrote."""
    if not path.exists():
        return
    try:
        ours = path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("format") == "tofu-export/policy"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and is not a tofu-export policy; it is left alone",
                        hint=Hint("out", "policy.json", "another output path"))


def calibrate(
    checkpoint: Annotated[str, typer.Argument(help="The model: a checkpoint file (or a timm name: random weights).")],
    data: Annotated[Path, typer.Argument(help="Images: a folder, an ImageFolder, or a dataset root with train/.")],
    model: ModelOptions,
    runtime: RuntimeOptions,
    onnx: OnnxOptions,
    r: Annotated[int, typer.Option("--r", "-r", help="Tokens a reducing block removes.")] = 16,
    images: Annotated[int, typer.Option("--images", help="Calibration images, evenly spread over DATA.")] = 64,
    min_cosine: Annotated[
        float | None, typer.Option("--min-cosine", help="Fastest policy whose output cosine to the unreduced model "
                                   "stays at least this [default: 0.995 when no budget is given].")
    ] = None,
    speedup: Annotated[
        float | None, typer.Option("--speedup", help="Most faithful policy at least this much faster than the "
                                   "unreduced model (measured latencies, batch 1).")
    ] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option("--max-latency-ms", help="Most faithful policy at most this latency (batch 1).")
    ] = None,
    provider: Annotated[
        str, typer.Option("--provider", help="ONNX Runtime provider the latencies are measured on: cpu, cuda, "
                          "tensorrt.")
    ] = "cpu",
    out: Annotated[Path, typer.Option("--out", "-o", help="Policy file to write; the plot goes beside it (.png).")]
    = Path("policy.json"),
    as_json: JsonOption = False,
) -> None:
    """Measure, per block, how much reducing tokens there damages the output with prune, mean and MLERP, the
    linearity criterion on the pairs matching would merge, and the latency each mode adds; choose per-block modes
    and r under one budget; verify the choice on the images; write policy.json and a plot.

    Use the policy with --policy on export, eval, sweep, profile and schedule.

    Examples:

      tofu-export calibrate dinov2.safetensors data/fashion-mnist --r 16 --min-cosine 0.998

      tofu-export calibrate deit_small.pth /data/imagenet/train --speedup 1.6 -o deit-policy.json
    """
    from tofu_export.artifacts import check_file_output
    from tofu_export.calibration import Budget, calibrate, load_images, plot_policy
    from tofu_export.calibration.measured import ExportSettings

    runtime.check()
    if min_cosine is None and speedup is None and max_latency_ms is None:
        min_cosine = 0.995
    budget = Budget(min_cosine=min_cosine, speedup=speedup, max_latency_ms=max_latency_ms)
    plot_path = out.with_suffix(".png")
    _check_replaceable(out)
    check_file_output(out)  # a folder, or a file where its folder should be: refused before calibrating
    loaded = model.load(checkpoint)
    batch, source = load_images(data, loaded.model, images)
    start = time.perf_counter()
    config = onnx.build()  # how the graphs the latencies are measured on are exported: as the user exports
    settings = ExportSettings(config.exporter, config.opset or 17, config.simplify)
    policy = calibrate(loaded.model, batch, r=r, budget=budget, provider=provider, threads=runtime.threads,
                       source=source, settings=settings)
    seconds = time.perf_counter() - start
    checkpoint_record = {"source": str(checkpoint), "sha256": loaded.sha256, "arch": loaded.arch.name}
    policy = dataclasses.replace(policy, source=dict(policy.source, checkpoint=checkpoint_record,
                                                     seconds=round(seconds, 1)))
    policy.save(out)
    plot_policy(policy, plot_path)
    m = policy.measurements
    if as_json:
        print_json({"policy": str(out), "plot": str(plot_path), "modes": list(policy.modes), "r": list(policy.r),
                    "predicted_cosine": m["predicted_cosine"], "measured_cosine": m["measured_cosine"],
                    "predicted_speedup": m["predicted_speedup"], "measured_speedup": m.get("measured_speedup"),
                    "held_out_cosine": m.get("held_out_cosine"), "seconds": seconds})
        return
    table = Table(title=f"{checkpoint}: policy for {budget.to_dict()} ({source['count']} images, {seconds:.0f} s)")
    for column in ("block", "mode", "r", "damage prune", "damage mean", "damage mlerp", "linearity"):
        table.add_column(column, justify="right")
    for i, (mode, removed) in enumerate(zip(policy.modes, policy.r, strict=True)):
        damage = [f"{m['damage'][k][i]:.1e}" for k in ("prune", "mean", "mlerp")]
        table.add_row(str(i), mode if removed else "-", str(removed), *damage, f"{m['linearity'][i]['mean']:.3f}")
    Console().print(table)
    tome = m["uniform"]["mean"]
    typer.echo(f"cosine: predicted {m['predicted_cosine']:.5f}, measured {m['measured_cosine']:.5f} "
               f"(ToMe at r={r}: {tome['measured_cosine']:.5f}); predicted {m['predicted_ms']:.1f} ms, "
               f"{m['predicted_speedup']:.2f}x over {m['baseline_ms']:.1f} ms ({m['latency']['backend']})")
    if m.get("held_out_cosine") is not None:
        typer.echo(f"held-out images ({m['held_out_images']}, never searched): cosine {m['held_out_cosine']:.5f}")
    if "measured_speedup" in m:
        timed = m["measured_latency"]
        typer.echo(f"measured on the exported graphs ({timed['exporter']}, opset {timed['opset']}, {timed['rounds']} "
                   f"interleaved rounds): {m['measured_speedup']:.2f}x (quartiles {timed['speedup_iqr'][0]:.2f}-"
                   f"{timed['speedup_iqr'][1]:.2f}x), predicted {m['predicted_speedup']:.2f}x")
    typer.echo(f"wrote {out} and {plot_path}")
