"""``tofu-export profile ARTIFACT``: latency percentiles, throughput, memory and where the time goes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.options import (
    BackendOptions,
    JsonOption,
    ModelOptions,
    RuntimeOptions,
    ToFuOptions,
    parse_int_list,
)
from tofu_export.cli.output import print_json


def profile(
    artifact: Annotated[str, typer.Argument(help="model.onnx, model.engine, or a checkpoint (profiled in PyTorch).")],
    model: ModelOptions,
    tofu: ToFuOptions,
    runtime: RuntimeOptions,
    backend: BackendOptions,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = 10,
    iters: Annotated[int | None, typer.Option(help="Timed runs per batch size.")] = 50,
    budget_s: Annotated[float | None, typer.Option(help="Or: time budget per batch size (seconds).")] = None,
    breakdown: Annotated[bool, typer.Option(help="Per-op breakdown: attention, MLP, token reduction, rest.")] = True,
    report: Annotated[Path | None, typer.Option(help="Also write a Markdown report here (and .json beside).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure latency percentiles, throughput, memory and where the time goes, on this machine.

    Timings discard warm-up runs and synchronise GPUs; the spread (p90, p99, std) is reported. On a Jetson the
    power draw from tegrastats gives energy per image; elsewhere those fields say why they are missing. A
    checkpoint is patched with the token-reduction options (static, at its own input size) and run in PyTorch.

    Examples:

      tofu-export profile artifacts/deit-tofu-r16/model.onnx --batch 1,8 --threads 2

      tofu-export profile model.pth --backend torch --r 16 --mode tofu --device cuda

      tofu-export profile artifacts/deit-tofu-r16-onnx/model.onnx --backend ort-cuda
    """
    from tofu_export.artifacts import check_file_output
    from tofu_export.jobs.profile import profile_source
    from tofu_export.reports.profile import render_table, write_json, write_markdown

    runtime.check()
    if report is not None:
        check_file_output(report)  # before profiling, not after
    chosen = backend.build(artifact)
    result = profile_source(
        artifact, batch_sizes=parse_int_list(batch, "batch"), warmup=warmup, iters=iters, budget_s=budget_s,
        breakdown=breakdown, backend=chosen, threads=runtime.threads, spinning=runtime.spin,
        tofu=tofu.build(model.img_size) if chosen.runtime == "torch" else None, arch=model.arch,
        trust_pickle=model.trust_pickle,
    )
    if report is not None:
        write_markdown(report, [result], title=f"Latency profile of {artifact}")
        write_json(report.with_suffix(".json"), [result])
    if as_json:
        print_json(result.to_dict())
    else:
        typer.echo(render_table([result]))
