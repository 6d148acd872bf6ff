"""``tofu-export [export] CHECKPOINT``: checkpoint -> ToFu -> verified ONNX (-> ORT model, TensorRT engine)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tofu_export.cli.errors import EXIT_ENGINE_NOT_BUILT, console
from tofu_export.cli.options import JsonOption, ModelOptions, OnnxOptions, ToFuOptions, TrtOptions
from tofu_export.cli.output import print_json, steps

TargetOption = Annotated[str, typer.Option("--target", "-t", help="onnx | ort | trt", rich_help_panel="Output")]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Artifact folder [default: artifacts/CHECKPOINT-MODE-rR].",
                 rich_help_panel="Output"),
]
ForceOption = Annotated[
    bool,
    typer.Option("--force", help="Replace an existing artifact folder that tofu-export wrote (it holds a "
                 "tofu-export manifest.json); any other folder or file is never replaced.", rich_help_panel="Output"),
]


def export(
    checkpoint: Annotated[Path, typer.Argument(help="timm-format checkpoint: .pth/.pt state dict or .safetensors.")],
    model: ModelOptions,
    tofu: ToFuOptions,
    onnx: OnnxOptions,
    trt: TrtOptions,
    out: OutOption = None,
    target: TargetOption = "onnx",
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Export a checkpoint with ToFu to a verified static ONNX graph (and an ORT model or TensorRT engine).

    Writes an artifact folder with model.onnx, manifest.json (input sha256, arch, r schedule, tokens per block,
    GFLOPs, parity, TensorRT check) and, per --target, model.ort.onnx or model.engine. The folder appears only
    when every step passed.

    Examples:

      tofu-export model.pth --r 16 --target trt --fp16

      tofu-export export vit.safetensors --arch vit_base_patch16_224 --mode tome --r 8 -o artifacts/vit-tome

      tofu-export model.pth --policy policy.json --target ort
    """
    from tofu_export.config import ExportConfig
    from tofu_export.pipeline import run_export

    config = ExportConfig(
        tofu=tofu.build(model.img_size), onnx=onnx.build(), trt=trt.build(), target=target, arch=model.arch,
        trust_pickle=model.trust_pickle, force=force, command=shlex.join(["tofu-export", *sys.argv[1:]]),
    )
    out = out or Path("artifacts") / f"{checkpoint.stem}-{tofu.label}"
    with steps(not as_json) as step:
        outcome = run_export(checkpoint, out, config, step)
    if as_json:
        print_json({"out_dir": str(outcome.out_dir), "engine_error": outcome.engine_error,
                    **outcome.manifest.to_dict()})
    else:
        print_summary(outcome)
    if outcome.engine_error:
        console.print(f"[bold yellow]TensorRT engine not built:[/] {outcome.engine_error}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(EXIT_ENGINE_NOT_BUILT)


def print_summary(outcome: Any) -> None:
    """The export's result as one table on stdout."""
    m = outcome.manifest
    parity = m.onnx["parity"] or {}
    table = Table(title=f"exported to {outcome.out_dir}", show_header=False)
    table.add_row("architecture", f"{m.arch['name']}  ({m.arch['reason']})")
    table.add_row("ToFu", f"mode={m.tofu.mode}  r={m.tofu.r}")
    table.add_row("reduce per block", ", ".join(m.tofu.layer_modes))
    table.add_row("tokens per block", ", ".join(map(str, m.tofu.tokens)))
    g = m.gflops
    table.add_row("GFLOPs", f"{g['original']:.2f} -> {g['tofu']:.2f}  ({g['ratio']:.2f}x fewer)")
    agreement = f", top-1 agreement {parity['top1_agreement']:.0%}" if parity.get("top1_agreement") is not None else ""
    table.add_row(
        "parity (ORT vs PyTorch)",
        f"max |diff| {parity.get('max_abs_diff', float('nan')):.2e}, {parity.get('images_within_tolerance', 0):.0%} "
        f"of images within tolerance, min cosine {parity.get('min_cosine', float('nan')):.7f}{agreement}",
    )
    check = m.tensorrt_check
    verdicts = [f"TensorRT {target}: {'OK' if ok else 'FAIL'}" for target, ok in check["per_target"].items()]
    if not check["per_target"].get("8.5", True) and m.onnx["opset"] >= 17:
        verdicts.append("(JetPack 5 has no LayerNormalization importer: export with --opset 16 for it)")
    table.add_row("TensorRT check", ", ".join(verdicts))
    if m.ort:
        table.add_row("ORT CPU latency (batch 1)", f"p50 {m.ort['quick_latency_ms']['p50']:.2f} ms")
    if m.tensorrt and m.tensorrt.get("file"):
        table.add_row("TensorRT engine", m.tensorrt["file"])
    for note in m.notes:
        table.add_row("note", note)
    Console().print(table)
