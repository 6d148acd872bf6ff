"""``tofu-export profile ARTIFACT``: latency percentiles, throughput, memory and where the time goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tofu_export.cli.options import (
    BackendOptions,
    JsonOption,
    ModelOptions,
    RuntimeOptions,
    ToFuOptions,
    parse_int_list,
)
from tofu_export.cli.output import library_warnings, print_json, print_table, warnings_note
from tofu_export.profiling.device import load_average


def profile(
    artifact: Annotated[str, typer.Argument(help="model.onnx, model.engine, an artifact folder (its model.onnx; "
                                            "model.engine with --backend trt), or a checkpoint (profiled in "
                                            "PyTorch).")],
    model: ModelOptions,
    tofu: ToFuOptions,
    runtime: RuntimeOptions,
    backend: BackendOptions,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = 10,
    iters: Annotated[int | None, typer.Option(help="Timed runs per batch size.")] = 50,
    budget_s: Annotated[float | None, typer.Option(help="Or: time budget per batch size (seconds).")] = None,
    breakdown: Annotated[bool, typer.Option(help="Per-op breakdown: attention, MLP, token reduction, rest.")] = True,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Time on these images (an image file, or a folder: as many as the largest batch, spread "
        "evenly; a batch larger than the images repeats them) in the artifact's preprocessing, instead of seeded "
        "noise. A graph's time can depend on its input's values: on noise a ViT can run slower than on the images "
        "it will see.")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Also write a Markdown report here, with its .json and a .png figure (latency, throughput and where the "
        "time goes per batch size) beside it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure latency percentiles, throughput, memory and where the time goes, on this machine.

    Timings discard warm-up runs and synchronise GPUs; the spread (p90, p99, std) is reported. On a Jetson the
    power draw from tegrastats gives energy per image; elsewhere those fields say why they are missing. A
    checkpoint is patched with the token-reduction options (static, at its own input size) and run in PyTorch.

    Examples:

      tofu-export profile artifacts/deit-tofu-r16/model.onnx --batch 1,8 --threads 2

      tofu-export profile artifacts/deit-tofu-r16/model.onnx --data images/ (times on your images, not noise)

      tofu-export profile model.pth --backend torch --r 16 --mode tofu --device cuda --cuda-graphs

      tofu-export profile artifacts/deit-tofu-r16-onnx/model.onnx --backend ort-cuda
    """
    from tofu_export.artifacts import graph_in
    from tofu_export.jobs.profile import profile_source
    from tofu_export.reports.profile import write_json, write_markdown

    runtime.check()
    artifact = str(graph_in(artifact, engine=backend.backend == "trt"))  # an artifact folder: the graph in it
    if report is not None:
        from tofu_export.output_paths import (
            FileOutput,
            check_file_outputs,
            is_profile_json,
            is_profile_markdown,
            is_tofu_png,
        )

        check_file_outputs([FileOutput(report, is_profile_markdown, "profile report", "report"),
                            FileOutput(report.with_suffix(".json"), is_profile_json, "profile JSON", "report"),
                            FileOutput(report.with_suffix(".png"), is_tofu_png, "profile figure", "report")],
                           inputs=[artifact])  # before profiling, not after
    chosen = backend.build(artifact)
    with library_warnings() as caught:
        result = profile_source(
            artifact, batch_sizes=parse_int_list(batch, "batch"), warmup=warmup, iters=iters, budget_s=budget_s,
            breakdown=breakdown, images=data, backend=chosen, threads=runtime.threads, spinning=runtime.spin,
            tofu=tofu.build(model.img_size) if chosen.runtime == "torch" else None, arch=model.arch,
            num_heads=model.num_heads, trust_pickle=model.trust_pickle,
        )
    if report is not None:
        from tofu_export.reports.profile_plot import plot_profile

        write_markdown(report, [result], title=f"Latency profile of {artifact}")
        write_json(report.with_suffix(".json"), [result])
        plot_profile([result], report.with_suffix(".png"))
    reference = export_reference(artifact)
    note = warnings_note(caught)
    if note and not as_json:
        typer.echo(note, err=True)
    if as_json:
        print_json({**result.to_dict(), "load_average": load_average(), "at_export": reference})
    else:
        print_profile(result, chosen.label, reference)


def export_reference(artifact: str) -> dict[str, Any] | None:
    """The quick look recorded when the artifact was exported (baseline and this graph, batch 1, and the load then):
    the baseline beside today's figure, and a reason when the two differ."""
    from tofu_export.manifest import Manifest

    manifest = Manifest.read_if_any(Path(artifact).parent)
    quick = None if manifest is None else manifest.quick_look
    if quick is None or quick.latency is None:
        return None
    latency = quick.latency
    return {"baseline_p50_ms": latency.baseline.p50_ms, "p50_ms": latency.tofu.p50_ms, "speedup": latency.speedup,
            "load": latency.load[0] if latency.load else None}


def print_profile(result: Any, backend: str, reference: dict[str, Any] | None) -> None:
    """The op breakdown (where measured), then the one latency table with the spread, the load and the export's
    quick look beside it."""
    from rich.console import Console
    from rich.table import Table

    from tofu_export.engines.base import NOISE
    from tofu_export.profiling.breakdown import CATEGORIES

    console = Console()
    profiled = [batch for batch in result.batches if batch.breakdown is not None]
    if profiled:
        title = "where the time goes (op profiler, ms per run; on a GPU the kernel time, without launch gaps)"
        parts = Table(title=title, title_justify="left")
        for column in ("batch", *CATEGORIES, "sum"):
            parts.add_column(column.replace("_", " "), justify="right")
        for batch in profiled:
            values = [batch.breakdown.by_category_ms.get(name, 0.0) for name in CATEGORIES]
            parts.add_row(str(batch.batch_size), *(f"{v:.2f}" for v in values), f"{batch.breakdown.total_ms:.2f}")
        print_table(console, parts)
    load = load_average()
    caption = [f"{backend}, load average {load[0]:.1f} now." if load else f"{backend}.",
               f"Timed on {result.timed_on}" + ("" if result.timed_on != NOISE else " (--data: on your images)") + ".",
               "Spread: p90 and p99 of the timed runs, and their standard deviation."]
    if reference is not None:
        then = f" at load {reference['load']:.1f}" if reference.get("load") is not None else ""
        caption.append(f"At export (quick look{then}, batch 1): baseline {reference['baseline_p50_ms']:.1f} ms, this "
                       f"graph {reference['p50_ms']:.1f} ms ({reference['speedup']:.2f}x); a different figure today "
                       "is mostly a different load.")
    table = Table(title=f"batch latency on {backend}", title_justify="left",
                  caption=" ".join(caption), caption_justify="left")
    for column in ("batch", "runs", "p50 ms", "p90 / p99 ms", "std ms", "images/s", "peak RSS MiB"):
        table.add_column(column, justify="right")
    for batch in result.batches:
        lat = batch.latency
        table.add_row(str(lat.batch_size), str(lat.n), f"{lat.p50_ms:.2f}", f"{lat.p90_ms:.2f} / {lat.p99_ms:.2f}",
                      f"{lat.std_ms:.2f}", f"{lat.throughput_ips:.1f}",
                      f"{batch.memory.peak_rss_mib:.0f}" if batch.memory.peak_rss_mib is not None else "-")
    print_table(console, table)
