"""``tofu-export eval MODEL DATA``: what the reduction costs in accuracy, on real images, against the unreduced
model and against ToMe at the same per-block r."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tofu_export.cli.options import JsonOption, ModelOptions, RuntimeOptions, ToFuOptions, ZeroShotOptions
from tofu_export.cli.output import print_json, print_line, print_table


def eval_command(
    model_path: Annotated[str, typer.Argument(help="Checkpoint (patched in PyTorch), or model.onnx / model.engine, "
                                              "or an artifact folder (its model.onnx).")],
    data: Annotated[Path, typer.Argument(help="ImageFolder (class subfolders), or a folder with train/ and test/.")],
    model: ModelOptions,
    tofu: ToFuOptions,
    runtime: RuntimeOptions,
    zero_shot: ZeroShotOptions,
    reference: Annotated[
        str | None,
        typer.Option(help="The unreduced model scored against: for ONNX/engine artifacts the checkpoint they came "
                     "from [default: the one their manifest.json records, checked by its sha256]; for a checkpoint "
                     "`tofu-export finetune` tuned, the one it was tuned from [default: the one its sidecar records]."),
    ] = None,
    compare_tome: Annotated[
        bool, typer.Option("--compare-tome/--no-compare-tome", help="Also score ToMe at the same per-block r.")
    ] = True,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Use at most this many images per split.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a reduced model on real images against the unreduced model and ToMe at the same r.

    Classifiers: top-1/top-5 and the share of images whose top-1 class is kept. Backbones (no classifier head):
    the cosine similarity of their pooled features to the unreduced model's (± standard error), and k-NN accuracy
    on a labelled folder with train/ and test/ splits. CLIP and SigLIP with --zero-shot: top-1/top-5 against the
    text tower's embedding of each class name.

    Examples:

      tofu-export eval deit_small.pth /data/imagenet/val --r 16 --mode tofu

      tofu-export eval artifacts/dino-tofu-r16-onnx/model.onnx data/fashion-mnist

      tofu-export eval clip-vit-b-32/ data/fashion-mnist --zero-shot --prompt "a photo of a {}, a type of clothing."
    """
    runtime.check()
    config = tofu.build(model.img_size)  # every option checked before torch is loaded
    zero = zero_shot.build()
    from tofu_export.jobs.evaluate import evaluate_model

    report = evaluate_model(
        model_path, data, tofu=config, reference=reference, arch=model.arch,
        num_heads=model.num_heads, trust_pickle=model.trust_pickle, batch_size=batch_size, limit=limit,
        threads=runtime.threads, compare_tome=compare_tome, img_size=model.img_size, zero_shot=zero,
    )
    if as_json:
        print_json(report)
    else:
        print_evaluation(report)


def evaluation_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(figure, unreduced, ToMe, this model)`` rows, formatted with units (accuracies in %)."""
    m, tome = report["metrics"], report.get("tome") or {}
    none = "-"

    def pct(metrics: dict[str, Any], key: str) -> str:
        return f"{metrics[key]:.1f}%" if metrics.get(key) is not None else none

    if report["task"] == "classification":
        return [
            ("top-1 accuracy", pct(m, "reference_top1"), pct(tome, "candidate_top1"), pct(m, "candidate_top1")),
            ("top-5 accuracy", pct(m, "reference_top5"), pct(tome, "candidate_top5"), pct(m, "candidate_top5")),
            ("top-1 class kept", "100.0%", pct(tome, "top1_agreement"), pct(m, "top1_agreement")),
        ]

    def cosine(metrics: dict[str, Any]) -> str:
        if metrics.get("cosine_mean") is None:
            return none
        se = metrics.get("cosine_se")
        return f"{metrics['cosine_mean']:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    rows = [("cosine to unreduced (mean ± SE)", "1", cosine(tome), cosine(m)),
            ("cosine, worst image", "1", f"{tome['cosine_min']:.4f}" if tome else none, f"{m['cosine_min']:.4f}")]
    paired = report.get("vs_tome")
    if paired:  # the two cosines image by image: the SE of their difference, not of either
        se = "" if paired["standard_error"] is None else f" ± {paired['standard_error']:.5f}"
        rows.append(("minus ToMe, same images (± SE)", "", "", f"{paired['difference']:+.5f}{se}"))
    if "candidate_knn_top1" in m:
        rows.append(("k-NN top-1", pct(m, "reference_knn_top1"), pct(tome, "candidate_knn_top1"),
                     pct(m, "candidate_knn_top1")))
    return rows


def print_evaluation(report: dict[str, Any]) -> None:
    """Notes first, then the one table that answers the question."""
    from rich.console import Console
    from rich.table import Table

    from tofu_export.schedule import compact_r

    console = Console()
    for note in report.get("notes", []):
        print_line(console, f"note: {note}")
    r = compact_r(report["r"]) if report["r"] else "unknown"
    images = f"{report['n_eval']} images" + (f" (+{report['n_train']} to fit k-NN)" if report.get("n_train") else "")
    task = ", zero-shot" if report.get("zero_shot") else ""
    table = Table(title=f"{report['candidate']}: {report['mode']}, r per block {r}{task}", title_justify="left",
                  caption=f"{images} from {report['data']}", caption_justify="left")
    table.add_column("")
    table.add_column("unreduced", justify="right")
    table.add_column("ToMe, same r" if report.get("tome") else "ToMe (not run)", justify="right")
    table.add_column(report["mode"], justify="right")
    for row in evaluation_rows(report):
        table.add_row(*row)
    print_table(console, table)
