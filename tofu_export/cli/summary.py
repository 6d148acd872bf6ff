"""What ``tofu-export export`` and ``demo`` print: what was exported, where it builds, and the quick look.

The figures and their formatting come from the report (``reports.artifact``), so the terminal and report.md say
the same thing; only the advice that names flags is written here.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tofu_export.cli.groups import flag_for
from tofu_export.cli.output import print_line, print_table
from tofu_export.manifest import MANIFEST, Manifest, QuickLook
from tofu_export.reports.artifact import (
    REPORT,
    builds_on,
    quick_look_caption,
    quick_look_rows,
    tofu_label,
)
from tofu_export.schedule import compact_r
from tofu_export.tensorrt.targets import TargetVerdict, target_verdicts


def print_summary(outcome: Any, console: Console | None = None) -> None:
    """The export's result on stdout: what was exported, then (last) the quick look that answers what it bought."""
    console = console or Console()
    m = outcome.manifest
    print_table(console, _export_table(outcome))
    for line in [*(f"note: {note}" for note in m.notes), *_advice(m)]:
        print_line(console, line)
    print_line(console, f"report: {outcome.out_dir / REPORT}")
    if m.quick_look:
        print_table(console, _quick_look_table(m.quick_look, tofu_label(m)))


def _export_table(outcome: Any) -> Table:
    m = outcome.manifest
    table = Table(title=f"exported to {outcome.out_dir}", show_header=False, title_justify="left")
    table.add_row("architecture", f"{m.arch.name}  ({m.arch.reason})")
    table.add_row("ToFu", f"mode {m.tofu.mode}, {tofu_label(m)}")
    table.add_row("r per block", compact_r(m.tofu.r))
    table.add_row("reduce per block", ", ".join(m.tofu.layer_modes))
    table.add_row("tokens per block", ", ".join(map(str, m.tofu.tokens)))
    g = m.gflops
    table.add_row("GFLOPs", f"{g.original:.2f} -> {g.tofu:.2f}  ({g.ratio:.2f}x fewer)")
    parity = m.onnx.parity
    if parity is not None:
        agreement = f", top-1 agreement {parity.top1_agreement:.0%}" if parity.top1_agreement is not None else ""
        table.add_row(
            "parity (ORT vs PyTorch)",
            f"{'pass' if parity.ok else 'FAIL'}: max |diff| {parity.max_abs_diff:.2e}, "
            f"{parity.images_within_tolerance:.0%} of images within tolerance, min cosine {parity.min_cosine:.7f}"
            f"{agreement}",
        )
    else:
        table.add_row("parity (ORT vs PyTorch)", "not checked")
    table.add_row("TensorRT", _verdict_line(_verdicts(m), m.onnx.opset))
    if m.tensorrt and m.tensorrt.file:
        table.add_row("TensorRT engine", m.tensorrt.file)
    table.add_row("files", ", ".join([*(entry["name"] for entry in m.files), MANIFEST]))
    return table


def _verdicts(m: Manifest) -> list[TargetVerdict]:
    return target_verdicts(m.tensorrt_check)


def _verdict_line(verdicts: list[TargetVerdict], opset: int) -> str:
    """``builds on TensorRT 10 (JetPack 6) (opset 17)``; a release the export was made for that fails is a FAIL."""
    failing = [v for v in verdicts if v.requested and not v.builds]
    line = f"builds on {builds_on(verdicts)} (opset {opset})"
    if failing:
        line += "; FAIL for " + "; ".join(f"{v.label}: {', '.join(v.errors)}" for v in failing)
    return line


def _advice(m: Manifest) -> list[str]:
    """Notes that name flags: how to export for the releases this artifact does not build on, and for fidelity."""
    lines = []
    for v in _verdicts(m):
        if not v.builds and not v.requested:
            lines.append(f"note: for {v.label}, export with {flag_for('trt')} {v.target} (or {flag_for('jetpack')} "
                         f"{v.jetpack}); the opset and graph follow.")
    quick = m.quick_look
    if quick is not None and not quick.fidelity:
        lines.append(f"note: outputs were not compared on real images: pass {flag_for('data')} DIR (a folder of "
                     "images) to see how close ToFu stays to the original.")
    return lines


def _quick_look_table(quick: QuickLook, label: str) -> Table:
    table = Table(title=quick_look_caption(quick), title_justify="left")
    table.add_column("")
    table.add_column("baseline (r=0)", justify="right")
    table.add_column(label, justify="right")
    for row in quick_look_rows(quick):
        table.add_row(*row)
    return table
