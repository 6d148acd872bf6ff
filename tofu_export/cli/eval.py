"""``tofu-export eval MODEL DATA``: what the reduction costs in accuracy, on real images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.options import JsonOption, ModelOptions, RuntimeOptions, ToFuOptions
from tofu_export.cli.output import print_json


def eval_command(
    model_path: Annotated[str, typer.Argument(help="Checkpoint (patched in PyTorch), or model.onnx / model.engine.")],
    data: Annotated[Path, typer.Argument(help="ImageFolder (class subfolders), or a folder with train/ and test/.")],
    model: ModelOptions,
    tofu: ToFuOptions,
    runtime: RuntimeOptions,
    reference: Annotated[
        str | None, typer.Option(help="For ONNX/engine artifacts: the checkpoint they came from (reference model).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Use at most this many images per split.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a reduced model on real images: top-1/top-5 for classifiers, fidelity for backbones.

    Backbones (no classifier head) are scored by the cosine similarity of their pooled features to the unreduced
    model's, and by k-NN accuracy of both on a labelled folder with train/ and test/ splits.

    Examples:

      tofu-export eval deit_small.pth /data/imagenet/val --r 16 --mode tofu

      tofu-export eval artifacts/dino-tofu-r16/model.onnx data/fashion-mnist --reference dinov2.safetensors
    """
    from tofu_export.jobs.evaluate import evaluate_model

    runtime.check()
    report = evaluate_model(
        model_path, data, tofu=tofu.build(model.img_size), reference=reference, arch=model.arch,
        trust_pickle=model.trust_pickle, batch_size=batch_size, limit=limit, threads=runtime.threads,
    )
    if as_json:
        print_json(report)
    else:
        for key, value in report.items():
            typer.echo(f"{key}: {value}")
