"""``tofu-export finetune CHECKPOINT DATA``: tune a checkpoint to run with its token reduction, by distilling it
towards its own unreduced outputs on your images; writes OUT.safetensors, OUT.json and OUT.png (a timm model) or
the folder OUT (a transformers or open_clip model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tofu_export.cli.options import JsonOption, ModelOptions, RuntimeOptions, ToFuOptions
from tofu_export.cli.output import print_json, print_line, print_table, steps


def finetune(
    checkpoint: Annotated[str, typer.Argument(help="The model: a timm checkpoint file, a transformers "
                                              "save_pretrained folder, an open_clip checkpoint (a hub folder, or a "
                                              "file with --arch open_clip:NAME), or a timm name (random weights).")],
    data: Annotated[Path, typer.Argument(help="Images: a folder, an ImageFolder, or a dataset root with train/ "
                                         "(used). No labels are needed.")],
    model: ModelOptions,
    tofu: ToFuOptions,
    runtime: RuntimeOptions,
    steps_: Annotated[int, typer.Option("--steps", help="Training steps.")] = 150,
    batch: Annotated[int, typer.Option("--batch", help="Images per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (after a 10-step warm-up).")] = 1e-4,
    weights: Annotated[str, typer.Option("--weights", help="What trains: vectors (norms, biases, LayerScale: "
                                         "under 1% of a ViT; steady on a few hundred images) or all.")] = "vectors",
    images: Annotated[int, typer.Option("--images", help="Training images, evenly spread over DATA.")] = 256,
    holdout: Annotated[int, typer.Option("--holdout", help="Further images of DATA, never trained on, that the "
                                         "fidelity before and after is measured on.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batches drawn.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Weights to write. A timm model: OUT.safetensors, "
                                             "with OUT.json (architecture, what they were tuned for) and OUT.png "
                                             "(the loss) beside; a transformers or open_clip model: a new folder "
                                             "OUT as its loader reads it (config, weights, tofu_finetune.json, "
                                             "loss.png) [default: "
                                             "CHECKPOINT-MODE-rR-tuned(.safetensors) here].")] = None,
    as_json: JsonOption = False,
) -> None:
    """Tune a checkpoint to keep its outputs with ToFu's token reduction in the loop.

    The unreduced model's outputs on DATA's images are the targets (no labels); a copy patched with the reduction
    you will export (--r, --mode or --policy) learns to match them (1 - cosine), by default in its norms, biases
    and LayerScale only. Fidelity (cosine to the unreduced model) is measured on held-out images before and after.
    Export the tuned weights with the same reduction. timm ViTs and Eva models are written back as a .safetensors
    file, transformers vision encoders as a save_pretrained folder, open_clip towers as a hub folder holding the
    whole CLIP model (the text tower as it was; open_clip loads it with create_model("local-dir:OUT")).

    Example:

      tofu-export finetune dinov2.safetensors data/fashion-mnist --r 24 -o dinov2-r24.safetensors

    then: tofu-export dinov2-r24.safetensors --r 24

      tofu-export finetune dinov2-hf/ data/fashion-mnist --r 24 -o dinov2-hf-r24

    (a transformers folder in, a folder out: tofu-export dinov2-hf-r24 --r 24)
    """
    from tofu_export.finetune.distill import DistillSettings
    from tofu_export.finetune.job import FinetuneOutputs, check_settings
    from tofu_export.models.tuned import written_as_folder

    runtime.check()  # every option before torch is loaded
    settings = DistillSettings(steps=steps_, batch=batch, lr=lr, weights=weights, seed=seed)  # type: ignore[arg-type]
    check_settings(settings, images, holdout)
    config = tofu.build(model.img_size)
    folder = written_as_folder(Path(checkpoint), model.arch)  # transformers, open_clip: as a folder
    if out is None:
        out = Path(f"{Path(checkpoint).name.split('.')[0]}-{tofu.label}-tuned{'' if folder else '.safetensors'}")
    FinetuneOutputs.at(out, folder=folder).check([checkpoint, data])
    from tofu_export.finetune.job import finetune as run

    with steps(enabled=not as_json) as step:
        loaded = model.load(checkpoint)
        if runtime.threads is not None:
            import torch

            torch.set_num_threads(runtime.threads)
        report = run(loaded, data, config, settings, out, images=images, holdout=holdout, progress=not as_json,
                     step=step)
    if as_json:
        print_json({k: v for k, v in report.items() if k != "loss"} | {"final_loss": report["loss"][-1]})
        return
    print_report(report, reduction_flags(tofu))


def reduction_flags(tofu: ToFuOptions) -> str:
    """The flags that export the reduction the weights were tuned for."""
    if tofu.policy is not None:
        return f"--policy {tofu.policy}"
    flags = [f"--r {tofu.r}", f"--mode {tofu.mode}"]
    if tofu.schedule != "constant":
        flags.append(f"--schedule {tofu.schedule}")
    if tofu.prune_layers is not None:
        flags.append(f"--prune-layers {tofu.prune_layers}")
    if not tofu.prop_attn:
        flags.append("--no-prop-attn")
    return " ".join(flags)


def gain_is_clear(gain: dict[str, Any]) -> bool:
    """Tuned minus untuned (``paired_difference``) at least two standard errors above zero."""
    se = gain["standard_error"] or 0.0
    return gain["difference"] > 2 * se


def print_report(report: dict[str, Any], flags: str) -> None:
    """The held-out fidelity before and after, then what was written and how to use it."""
    from rich.console import Console
    from rich.table import Table

    from tofu_export.schedule import compact_r

    before, after, gain = report["held_out_before"], report["held_out_after"], report["gain"]
    table = Table(title=f"{report['architecture']} with {report['tuned_for']['source']}, tokens removed per block "
                  f"{compact_r(report['tuned_for']['removes'])}", title_justify="left",
                  caption=f"{report['held_out']} held-out images of {report['data']}; trained on "
                  f"{report['images']} ({report['trained_weights']:,} weights, {report['seconds']:.0f} s)",
                  caption_justify="left")
    for column in ("cosine to unreduced", "before", "after"):
        table.add_column(column, justify="right" if column != "cosine to unreduced" else "left")
    table.add_row("mean ± SE", f"{before['mean']:.5f} ± {before['se']:.5f}", f"{after['mean']:.5f} ± "
                  f"{after['se']:.5f}")
    table.add_row("worst image", f"{before['min']:.5f}", f"{after['min']:.5f}")
    se = "" if gain["standard_error"] is None else f" ± {gain['standard_error']:.5f}"
    table.add_row("after - before, same images", "", f"{gain['difference']:+.5f}{se}")
    console = Console()
    for note in report["notes"]:
        print_line(console, f"note: {note}")
    print_table(console, table)
    written = report["outputs"]
    if Path(written["weights"]).is_dir():  # a folder checkpoint: the files its loader reads, and ours
        files = ", ".join(sorted(path.name for path in Path(written["weights"]).iterdir()))
        print_line(console, f"wrote the folder {written['checkpoint']} ({files})")
    else:
        print_line(console, f"wrote {written['weights']}, {written['sidecar']} and {written['plot']}")
    if not gain_is_clear(gain):
        print_line(console, "note: the tuned model is not clearly closer to the unreduced one on the held-out images "
                   "(the gain is under two standard errors); keep the original weights, or tune on more --images. "
                   "Tuning where the reduction costs little can cost fidelity on images unlike DATA (README)")
    print_line(console, f"next: tofu-export {written['checkpoint']} {flags}   (the reduction the weights were tuned "
               "for)")
