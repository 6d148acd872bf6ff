"""``tofu-export check MODEL.onnx``: would TensorRT build this graph? Answered without a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.errors import EXIT_CHECK_FAILED
from tofu_export.cli.options import JsonOption
from tofu_export.cli.output import print_json


def check(
    model: Annotated[Path, typer.Argument(help="An ONNX file.")],
    trt: Annotated[list[str] | None, typer.Option("--trt", help="TensorRT versions to check: 8.5, 10.")] = None,
    costs: Annotated[
        bool,
        typer.Option(
            "--costs",
            help="Also count, per block, the nodes the token reduction adds: pointwise ops (TensorRT fuses chains "
            "of them into one kernel), shape-only ops, and the rest (about one GPU kernel each).",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check an ONNX graph against TensorRT's ONNX support without a GPU (exit 1 if it would not build).

    Checks every node against TensorRT 8.5 (JetPack 5) and 10 (JetPack 6) operator support, static shapes
    (only the batch may vary), plugin-only ops (ScatterElements with a reduction), data-dependent control flow,
    and INT64/DOUBLE tensors.

    With --costs it also shows what the token reduction costs each block, the GPU risk at small batch sizes
    (each unfused node is a kernel launch), without a GPU.

    Example: tofu-export check artifacts/deit-tofu-r16/model.onnx --trt 10 --costs
    """
    from tofu_export.onnx_file import check_onnx_file
    from tofu_export.tensorrt.check import check_tensorrt_compat

    check_onnx_file(model)  # a missing, truncated or non-ONNX file is named here, before the deep checks
    report = check_tensorrt_compat(model, tuple(trt or ("8.5", "10")))
    reduction = None
    if costs:
        from tofu_export.exporters.graph_costs import reduction_costs

        reduction = reduction_costs(model)
    if as_json:
        print_json({**report.to_dict(), **({"reduction_costs": reduction.to_dict()} if reduction else {})})
    else:
        typer.echo(report.render())
        if reduction is not None:
            typer.echo("")
            typer.echo(reduction.render() if reduction.blocks else "no token reduction found (no blocks.N/reduce "
                       "scope in the node names)")
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)
