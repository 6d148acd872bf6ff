"""``tofu-export [export] CHECKPOINT``: checkpoint -> ToFu -> verified ONNX (-> ORT model, TensorRT engine)."""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tofu_export.cli.errors import EXIT_ENGINE_NOT_BUILT, console
from tofu_export.cli.options import JsonOption, ModelOptions, OnnxOptions, ToFuOptions, TrtOptions
from tofu_export.cli.output import library_warnings, print_json, print_line, steps, warnings_note

TargetOption = Annotated[str, typer.Option("--target", "-t", help="onnx | ort | trt", rich_help_panel="Output")]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Artifact folder [default: artifacts/CHECKPOINT-MODE-rR-TARGET].",
                 rich_help_panel="Output"),
]
ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing artifact folder that tofu-export wrote (it holds a "
                 "tofu-export manifest.json); any other folder or file is never replaced.", rich_help_panel="Output"),
]
BenchOption = Annotated[
    bool,
    typer.Option("--bench/--no-bench", help="Quick look: also export the unreduced model (r=0) and time both on "
                 "ONNX Runtime on this CPU, interleaved, for a few seconds (a first figure, not a benchmark).",
                 rich_help_panel="Quick look"),
]
DataOption = Annotated[
    Path | None,
    typer.Option("--data", help="Images (a folder, flat or in class folders; up to 32 used) on which the quick look "
                 "compares ToFu's outputs with the unreduced model's: cosine, and top-1 agreement for classifiers. "
                 "With --precision int8, also the images the graph is calibrated on (with or without the quick look), "
                 "unless --calibration-data names others.",
                 rich_help_panel="Quick look"),
]


def _finite_seconds(value: float) -> float:
    """``--look-seconds`` is a finite number of seconds (``min=0`` alone lets ``nan`` through)."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number of seconds; give e.g. 6")
    return value


LookSecondsOption = Annotated[
    float,
    typer.Option("--look-seconds", min=0.0, callback=_finite_seconds,
                 help="Quick look: seconds of interleaved timing, both models together (at least 7 rounds run "
                 "however small).", rich_help_panel="Quick look"),
]
_RETARGET_DROP = {"--trt", "--jetpack", "--opset", "--out", "-o"}  # flags (with a value) a retarget command replaces


def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="A checkpoint: a timm .pth/.pt/.safetensors file (ViT, or Eva: EVA-02, DINOv3), or a transformers / "
             "open_clip folder.")],
    model: ModelOptions,
    tofu: ToFuOptions,
    onnx: OnnxOptions,
    trt: TrtOptions,
    out: OutOption = None,
    target: TargetOption = "onnx",
    force: ForceOption = False,
    bench: BenchOption = True,
    data: DataOption = None,
    look_seconds: LookSecondsOption = 6.0,
    as_json: JsonOption = False,
) -> None:
    """Export a checkpoint with ToFu to a verified static ONNX graph (and an ORT model or TensorRT engine).

    Writes an artifact folder with model.onnx, manifest.json (input sha256, arch, r schedule, tokens per block,
    GFLOPs, parity, TensorRT check, quick look), report.md + report.png and, per --target, model.ort.onnx or
    model.engine. The folder appears only when every step passed.

    The graph is made for TensorRT 10 (JetPack 6) unless --trt / --jetpack say otherwise (--trt 8.5 for JetPack 5
    exports opset 16). The quick look times the unreduced model against the ToFu graph on this CPU, and with --data
    compares their outputs on your images.

    Examples:

      tofu-export model.pth --r 16 --target trt --fp16

      tofu-export model.pth --r 16 --data images/ --trt 8.5

      tofu-export export vit.safetensors --arch vit_base_patch16_224 --mode tome --r 8 -o artifacts/vit-tome

      tofu-export model.pth --policy policy.json --target ort

      tofu-export model.pth --r 16 --precision int8 --data calibration_images/ --target trt
    """
    from tofu_export.config import ExportConfig

    config = ExportConfig(  # checks every option before torch is loaded
        tofu=tofu.build(model.img_size), onnx=onnx.build(data), trt=trt.build(), target=target,
        arch=model.arch, num_heads=model.num_heads, trust_pickle=model.trust_pickle, force=force,
        command=command_line(),
    )
    from tofu_export.quicklook import QuickLookSettings

    out = out or Path("artifacts") / f"{checkpoint.stem}-{tofu.label}-{target}"  # targets do not collide
    quick = QuickLookSettings(data=data, data_name=None if data is None else str(data),
                              budget_s=look_seconds) if bench else None
    export_and_report(checkpoint, out, config, quick, as_json=as_json)


def command_line() -> str:
    """The command line this process was started with, as the user would type it, run from the folder it ran in
    (so it works from any folder)."""
    return f"cd {shlex.quote(os.getcwd())} && " + shlex.join(["tofu-export", *sys.argv[1:]])


def retarget_command(argv: list[str], target: str, out: Path) -> str:
    """``argv`` with its TensorRT target, opset and output replaced: the export of the same model for ``target``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _RETARGET_DROP:
            skip = True
        elif arg.split("=", 1)[0] not in _RETARGET_DROP and arg not in ("--force", "--json"):
            kept.append(arg)
    command = shlex.join(["tofu-export", *kept, "--trt", target, "-o", f"{os.path.abspath(out)}-trt{target}"])
    return f"cd {shlex.quote(os.getcwd())} && {command}"  # relative paths in argv: run from the same folder


def report_commands(config: Any, out: Path, checkpoint: Path, quick_look: bool = True) -> Any:
    """The command lines report.md lists (absolute paths: they work from any folder): this export, the graph check,
    a profile, a sweep, and an export per other TensorRT release."""
    from tofu_export.artifacts import ONNX_NAME
    from tofu_export.reports.artifact import ReportCommands
    from tofu_export.tensorrt.ops import ALL_TARGETS

    out, checkpoint = Path(os.path.abspath(out)), Path(os.path.abspath(checkpoint))
    reproduce = {
        "This export" + (", with its quick look" if quick_look else ""): config.command,
        "The TensorRT check of the graph": shlex.join(["tofu-export", "check", str(out / ONNX_NAME)]),
        "A longer latency profile of the ToFu graph on this machine": shlex.join(
            ["tofu-export", "profile", str(out / ONNX_NAME), "--batch", "1,8"]),
    }
    if config.tofu.policy is None and isinstance(config.tofu.mode, str):
        r = config.tofu.r if isinstance(config.tofu.r, int) else None
        if r is not None:
            reproduce["A longer interleaved comparison, baseline vs this mode and r"] = shlex.join(
                ["tofu-export", "sweep", str(checkpoint), "--r", f"0,{r}", "--modes", config.tofu.mode,
                 "--iters", "50", "-o", f"{out}-sweep"])
    retarget = {t: retarget_command(sys.argv[1:], t, out) for t in ALL_TARGETS if t not in config.trt.targets}
    return ReportCommands(reproduce=reproduce, retarget=retarget)


def export_and_report(checkpoint: Path, out: Path, config: Any, quick: Any, *, as_json: bool) -> None:
    """Run the export and print its summary (or JSON); exit 3 when the TensorRT engine could not be built."""
    from tofu_export.cli.summary import print_summary
    from tofu_export.pipeline import run_export

    ran_quick_look = quick is not None and (config.target != "trt" or quick.data is not None)
    commands = report_commands(config, out, checkpoint, ran_quick_look)
    with library_warnings() as caught, steps(not as_json) as step:
        outcome = run_export(checkpoint, out, config, step, quick_look=quick, report_commands=commands)
    note = warnings_note(caught)
    if note and not as_json:
        print_line(console, note)
    if as_json:
        print_json({"out_dir": str(outcome.out_dir), "engine_error": outcome.engine_error,
                    **outcome.manifest.to_dict()})
    else:
        print_summary(outcome)
    if outcome.engine_error:
        print_line(console, outcome.engine_error, label="[bold yellow]TensorRT engine not built:[/] ")
        raise typer.Exit(EXIT_ENGINE_NOT_BUILT)
