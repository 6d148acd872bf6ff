"""``tofu-export clean-checkpoint CHECKPOINT -o OUT.safetensors``: a training checkpoint's weights (its EMA copy with
``--use-ema``) as a file of their own, the architecture its training record names stated beside it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.options import JsonOption
from tofu_export.cli.output import print_json, steps


def clean_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A training checkpoint (timm train.py's *.pth.tar, DeiT's "
                                               "checkpoint.pth, or any file tofu-export reads).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The weights file to write, OUT.safetensors; OUT.json is "
                                      "written beside it when the checkpoint names its architecture.")],
    use_ema: Annotated[bool, typer.Option("--use-ema", help="Take the EMA copy of the weights (state_dict_ema, "
                                          "model_ema) instead of the trained ones, as timm's --use-ema does.")] = False,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a checkpoint that contains pickled "
                                               "Python objects (they can run code when loaded).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write a training checkpoint's weights as .safetensors, with the architecture it names beside them.

    timm's train.py and DeiT's main.py save the trained weights and, with --model-ema, an EMA copy that is often the
    better model. Every tofu-export command reads the trained ones (as timm's validate.py without --use-ema); this
    writes the ones you pick as a file of their own, with OUT.json beside it naming the architecture (the record a
    bare weights file lacks), so export, calibrate, sweep and eval read them as they read any timm file. Nothing is
    ever replaced.

    Example: tofu-export clean-checkpoint output/train/model_best.pth.tar --use-ema -o ema.safetensors

    then: tofu-export ema.safetensors --r 16
    """
    from tofu_export.clean_checkpoint import clean_checkpoint as clean

    with steps(enabled=not as_json) as step:
        result = clean(checkpoint, out, use_ema=use_ema, trust_pickle=trust_pickle, step=step)
    if as_json:
        print_json({k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()})
        return
    taken = f" under {result.source_key!r}" if result.source_key else ""
    typer.echo(f"wrote {result.weights}: {result.tensors} tensors, the weights{taken} of {checkpoint.name}")
    if result.sidecar is not None:
        named = f"architecture {result.architecture}" if result.architecture else "a timm VisionTransformer"
        kwargs = f" with model_args {result.model_args}" if result.model_args else ""
        typer.echo(f"wrote {result.sidecar}: {named}{kwargs}")
    else:
        typer.echo(f"note: {checkpoint.name} names no architecture; give it with --arch when you export")
    typer.echo(f"next: tofu-export {result.weights} --r 16")
