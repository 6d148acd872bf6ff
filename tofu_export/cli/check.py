"""``tofu-export check MODEL.onnx``: would TensorRT build this graph? Answered without a GPU, for the releases the
artifact was made for (its manifest) unless ``--trt`` names others."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tofu_export.cli.errors import EXIT_CHECK_FAILED
from tofu_export.cli.options import JsonOption
from tofu_export.cli.output import print_json, print_table

if TYPE_CHECKING:
    from tofu_export.tensorrt.check import TrtCompatReport
    from tofu_export.tensorrt.issues import TrtIssue

ALL_RELEASES = ("8.5", "10")  # a graph without a tofu-export manifest is checked against every release


def check(
    model: Annotated[Path, typer.Argument(help="An ONNX file, or an artifact folder (its model.onnx).")],
    trt: Annotated[
        list[str] | None,
        typer.Option("--trt", help="TensorRT releases to check: 8.5, 10 [default: the ones the artifact was "
                     "exported for (its manifest.json), else both]."),
    ] = None,
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

    Checks every node against the operator support of the TensorRT releases the artifact was exported for (read
    from the manifest.json beside it; --trt 8.5 --trt 10 checks both), static shapes (only the batch may vary),
    plugin-only ops (ScatterElements with a reduction), data-dependent control flow, and INT64/DOUBLE tensors.
    Repeated findings are grouped ("25 x LayerNormalization: ...").

    With --costs it also shows what the token reduction costs each block, the GPU risk at small batch sizes
    (each unfused node is a kernel launch), without a GPU.

    Example: tofu-export check artifacts/deit-tofu-r16-onnx/model.onnx --costs
    """
    from tofu_export.artifacts import graph_in
    from tofu_export.onnx_file import check_onnx_file
    from tofu_export.tensorrt.check import check_tensorrt_compat

    model = graph_in(model)  # an artifact folder: its model.onnx
    check_onnx_file(model)  # a missing, truncated or non-ONNX file is named here, before the deep checks
    targets, source = default_targets(model, trt)
    report = check_tensorrt_compat(model, targets)
    reduction = None
    if costs:
        from tofu_export.exporters.graph_costs import reduction_costs

        reduction = reduction_costs(model)
    if as_json:
        print_json({**report.to_dict(), "targets_from": source,
                    "findings": grouped_findings(report.issues),
                    **({"reduction_costs": reduction.to_dict()} if reduction else {})})
    else:
        if reduction is not None:
            typer.echo(reduction.render())
        print_check(report, source)
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def default_targets(model: Path, trt: list[str] | None) -> tuple[tuple[str, ...], str]:
    """The releases to check and why: the ones asked for, else the manifest's, else the export's default."""
    if trt:
        return tuple(trt), "asked for"
    from tofu_export.manifest import Manifest

    manifest = Manifest.read_if_any(model.parent)
    requested = [] if manifest is None else manifest.tensorrt_check.requested
    if requested:
        return tuple(requested), "the artifact's manifest"
    return ALL_RELEASES, "every release (no tofu-export manifest beside the file)"


def grouped_findings(issues: list[TrtIssue]) -> list[dict[str, Any]]:
    """Findings with the same release, severity, op and message counted once: ``{"count", ...}``, most first."""
    counts = Counter((i.target, i.severity, i.op_type, i.message) for i in issues)
    return [{"count": n, "target": t, "severity": s, "op_type": op, "message": m}
            for (t, s, op, m), n in counts.most_common()]


def print_check(report: TrtCompatReport, source: str) -> None:
    """One table: per release, builds or not, and its grouped findings; the graph's size in the caption."""
    from rich.console import Console
    from rich.table import Table

    from tofu_export.tensorrt.ops import TARGET_LABELS

    findings = grouped_findings(report.issues)
    table = Table(title=f"TensorRT check (releases: {source})", title_justify="left", caption_justify="left",
                  caption=f"opset {report.opset}, {sum(report.op_counts.values())} nodes; checked from the graph, "
                  "without a GPU.")
    table.add_column("release")
    table.add_column("builds natively")
    table.add_column("findings")
    for target, ok in report.per_target.items():
        lines = [f"{f['count']} x {f['op_type'] or 'graph'}: {f['message']}" + (" (warning)" if f["severity"] ==
                 "warning" else "") for f in findings if f["target"] == target]
        table.add_row(TARGET_LABELS.get(target, target), "yes" if ok else "NO", "\n".join(lines) or "none")
    print_table(Console(), table)
