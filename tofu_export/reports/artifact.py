"""``report.md`` (and ``report.png``) of an artifact folder: what was exported, how close and how fast it is, where
it builds, and how to reproduce it, readable without the tool.

Written by the export pipeline into the staging folder before the manifest, so it appears with the rest. The
figures come from the manifest being written; the command lines come from the caller (the library does not know
the command line's flags). ``quick_look_rows`` and ``quick_look_caption`` are shared with the CLI summary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tofu_export.atomic import write_bytes_atomic
from tofu_export.manifest import MANIFEST, Manifest, ParityRecord, QuickLook
from tofu_export.profiling.timing import format_ms
from tofu_export.schedule import compact_r
from tofu_export.tensorrt.targets import TargetVerdict, target_verdicts

REPORT, PLOT = "report.md", "report.png"
FILE_ROLES = {
    "model.onnx": "the static-shape ONNX graph with the token reduction built in (only the batch is dynamic)",
    "model.ort.onnx": "ONNX Runtime's offline-optimised copy of it (extended level: portable across CPUs)",
    "model.engine": "the TensorRT engine",
    "timing.cache": "TensorRT's timing cache (makes rebuilding the engine faster)",
    MANIFEST: "everything in this report, machine-readable, with file hashes and package versions",
    REPORT: "this report",
    PLOT: "tokens per block and the quick look's latency",
}


@dataclass(frozen=True)
class ReportCommands:
    """Command lines the report lists, written by the caller: ``reproduce`` (label -> command) and ``retarget``
    (TensorRT release -> the command that exports for it)."""

    reproduce: dict[str, str] = field(default_factory=dict)
    retarget: dict[str, str] = field(default_factory=dict)


def write_report(folder: Path, manifest: Manifest, commands: ReportCommands | None = None) -> list[Path]:
    """Write ``report.png`` and ``report.md`` into ``folder`` (atomically each); returns their paths."""
    from tofu_export.reports.artifact_plot import plot_artifact

    commands = commands or ReportCommands()
    latency = manifest.quick_look.latency if manifest.quick_look else None
    plot = plot_artifact(folder / PLOT, manifest.tofu.tokens, latency, tofu_label(manifest))
    text = render_report(manifest, commands, files=_files(folder))
    return [plot, write_bytes_atomic(folder / REPORT, text.encode())]


def tofu_label(manifest: Manifest) -> str:
    """``ToFu r=16`` (one r everywhere) or ``ToMe r=8`` / ``ToFu r=16..10`` (the r each block really removes: the
    plan's, the same figure every command shows)."""
    name = {"tofu": "ToFu", "tome": "ToMe"}.get(manifest.tofu.mode, manifest.tofu.mode)
    r = manifest.tofu.r
    return f"{name} r={r[0]}" if len(set(r)) == 1 else f"{name} r={max(r)}..{min(r)}"


def clip_notes(plan: Any) -> list[str]:
    """One plain note when later blocks cannot remove the r asked for (``schedule.TokenPlan``: the plan removes
    fewer there); every command that patches a model prints it, the same way."""
    if not plan.clipped:
        return []
    got = ", ".join(f"{plan.r[i]} in block {i}" for i in plan.clipped)
    return [f"r={max(plan.requested)} does not fit every block: the schedule removes {got} (too few tokens left), "
            f"{sum(plan.r)} of the {sum(plan.requested)} tokens asked for; the figures are for that schedule. For "
            "the same r in every block, lower r or use a decreasing schedule."]


def render_report(manifest: Manifest, commands: ReportCommands, files: Sequence[tuple[str, int | None]]) -> str:
    """The Markdown text; ``files``: ``(name, bytes or None)`` of the folder's files."""
    sections = [
        _header(manifest),
        _exported(manifest),
        _quick_look(manifest.quick_look, tofu_label(manifest)),
        _parity(manifest.onnx.parity),
        _tensorrt(manifest, commands),
        _files_section(files, timed=bool(manifest.quick_look and manifest.quick_look.latency)),
        _notes(manifest.notes),
        _reproduce(commands),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def quick_look_caption(quick: QuickLook) -> str:
    """``quick look on this machine, not a benchmark: AMD EPYC, 2 cores, SIMD avx fma f16c; ONNX Runtime CPU,
    batch 1, 24 rounds, load 1.9``"""
    machine = quick.machine
    features = machine.get("cpu_features")  # absent in manifests written before it was recorded
    simd = None if features is None else "SIMD " + (" ".join(features) or "none listed")
    where = ", ".join(part for part in (machine.get("cpu"), f"{machine.get('cores')} cores", simd) if part)
    latency = quick.latency
    how = "outputs only (this target is not timed on this machine)"
    if latency:
        load = f", load average {latency.load[0]:.1f}" if latency.load else ""
        how = (f"ONNX Runtime CPU, batch {latency.batch} on {latency.timed_on}, {latency.baseline.rounds} rounds, "
               f"{latency.order}{load}")
    fidelity = quick.fidelity
    images = f"; images: {fidelity.name or fidelity.data}" if fidelity else ""
    return f"{quick.label}: {where}; {how}{images}"


def quick_look_rows(quick: QuickLook) -> list[tuple[str, str, str]]:
    """``(figure, baseline, ToFu)`` rows of the quick look, formatted for a table."""
    rows = []
    latency = quick.latency
    if latency:
        base, tofu, per = latency.baseline, latency.tofu, latency.speedup_per_round
        rows += [
            ("latency p50", f"{format_ms(base.p50_ms)} ms", f"{format_ms(tofu.p50_ms)} ms"),
            ("latency p10-p90", f"{format_ms(base.p10_ms)}-{format_ms(base.p90_ms)} ms",
             f"{format_ms(tofu.p10_ms)}-{format_ms(tofu.p90_ms)} ms"),
            ("speed-up per round", "1.00x", f"{latency.speedup:.2f}x (p10-p90 {per['p10']:.2f}-{per['p90']:.2f}x)"
             + (", not established" if per["p10"] <= 1.0 <= per["p90"] else "")),
        ]
    gflops = quick.gflops
    rows.append(("GFLOPs", f"{gflops['baseline']:.2f}",
                 f"{gflops['tofu']:.2f} ({gflops['baseline'] / gflops['tofu']:.2f}x fewer)"))
    fidelity = quick.fidelity
    if fidelity:
        rows.append(("cosine to baseline", "1", f"mean {fidelity.cosine_mean:.4f}, min "
                     f"{fidelity.cosine_min:.4f}, {fidelity.images} images"))
        if fidelity.top1_agreement is not None:
            rows.append(("top-1 same as baseline", "100%", f"{fidelity.top1_agreement:.0%}"))
    return rows


def builds_on(verdicts: Sequence[TargetVerdict]) -> str:
    """``TensorRT 10 (JetPack 6)`` and friends: the releases the graph builds on natively, or ``none``."""
    return ", ".join(v.label for v in verdicts if v.builds) or "none of the checked releases"


def _header(m: Manifest) -> str:
    from tofu_export import __version__

    return (f"# {m.arch.name} with {tofu_label(m)}\n\n"
            f"Exported by tofu-export {__version__} from `{m.input.path}` (sha256 `{m.input.sha256[:16]}...`).")


def _exported(m: Manifest) -> str:
    modes = ", ".join(f"{mode} x{count}" for mode, count in Counter(m.tofu.layer_modes).items())
    policy = m.tofu.policy
    g = m.gflops
    rows = [
        ("architecture", f"{m.arch.name} ({m.arch.reason})"),
        ("input", f"{m.img_size[0]}x{m.img_size[1]} pixels, batch dynamic"),
        *([("preprocessing", preprocessing_line(m.preprocessing))] if m.preprocessing else []),
        ("token reduction", f"mode {m.tofu.mode}" + (f" (policy {policy.describe()})" if policy else "")
         + f", proportional attention {'on' if m.tofu.prop_attn else 'off'}"),
        ("r per block", compact_r(m.tofu.r)),
        ("reduce per block", f"{', '.join(m.tofu.layer_modes)} ({modes})"),
        ("tokens per block", ", ".join(map(str, m.tofu.tokens))),
        ("GFLOPs", f"{g.original:.2f} -> {g.tofu:.2f} ({g.ratio:.2f}x fewer)"),
        ("ONNX", f"opset {m.onnx.opset}, {m.onnx.exporter} exporter" + (", simplified" if m.onnx.simplified else "")),
    ]
    return "## What was exported\n\n" + _table(("", ""), rows)


def preprocessing_line(config: dict) -> str:
    """``shorter side resized to 248 (bicubic), center crop 224x224, RGB / 255, mean (0.5, 0.5, 0.5), std (0.5, 0.5,
    0.5)``: timm's eval transform of the data config ``config`` (``timm.data.create_transform``), in words."""
    height, width = config["input_size"][-2:]
    mode, crop_pct = config.get("crop_mode") or "center", config.get("crop_pct") or 1.0
    side = math.floor(height / crop_pct)  # as timm scales: floor(size / crop_pct)
    if height != width:
        resize = f"resized to {side}x{math.floor(width / crop_pct)} ({mode} crop mode)"
    elif mode == "squash":
        resize = f"resized to {side}x{side}, the aspect ratio not kept"
    elif mode == "border":
        resize = f"longer side resized to {side}, padded to a square"
    else:
        resize = f"shorter side resized to {side}"
    crop = "" if side == height and mode != "center" else f", center crop {height}x{width}"
    numbers = ", ".join
    return (f"{resize} ({config.get('interpolation', 'bicubic')}){crop}, RGB / 255, "
            f"mean ({numbers(f'{v:g}' for v in config['mean'])}), std ({numbers(f'{v:g}' for v in config['std'])}); "
            "`timm.data.create_transform(**manifest['preprocessing'])` builds it")


def _quick_look(quick: QuickLook | None, label: str) -> str:
    if not quick:
        return "## Quick look\n\nNot run for this export (the baseline was neither exported nor timed)."
    lines = ["## Quick look: baseline vs ToFu", "", f"*{quick_look_caption(quick)}.*", "",
             _table(("", "baseline (r=0)", label), quick_look_rows(quick)), "", f"![tokens and latency]({PLOT})"]
    if quick.latency:
        lines += ["", "Both graphs ran in one process, alternating in a fresh random order every round, each timed "
                  "run right after an untimed one; the speed-up is the median of the per-round ratios. A few "
                  "seconds on a shared machine is a first figure: benchmark on the device before relying on it."]
    fidelity = quick.fidelity
    if fidelity:
        source = fidelity.name or fidelity.data
        lines += ["", f"Fidelity: the ToFu graph's output for each of {fidelity.images} images ({source}) "
                  "compared with the unreduced model's (cosine 1 = the same direction)."]
    else:
        lines += ["", "Fidelity was not measured: no images were given."]
    return "\n".join(lines)


def _parity(parity: ParityRecord | None) -> str:
    if not parity:
        return ""
    agreement = parity.top1_agreement
    rows = [
        ("inputs", ("the INT8 calibration images" if parity.precision == "int8" else "seeded random images")
                   + f", batches {', '.join(map(str, parity.batch_sizes))}"),
        ("max abs difference", f"{parity.max_abs_diff:.2e} (outputs up to {parity.output_scale:.3g})"),
        ("images within tolerance", f"{parity.images_within_tolerance:.0%} (tolerance {parity.tolerance:g})"),
        ("lowest cosine", f"{parity.min_cosine:.7f}"),
        *([("top-1 agreement", f"{agreement:.0%}")] if agreement is not None else []),
        *([("ONNX Runtime", "Q/DQ unfused (the graph's INT8 arithmetic, as TensorRT runs it), not this CPU's fused "
                            "integer kernels")] if parity.ort_optimization == "basic" else []),
        ("verdict", "pass" if parity.ok else "FAIL"),
    ]
    return "## Parity: ONNX Runtime vs PyTorch (the same ToFu model)\n\n" + _table(("", ""), rows)


def _tensorrt(m: Manifest, commands: ReportCommands) -> str:
    verdicts = target_verdicts(m.tensorrt_check)
    rows = [(v.label, "yes" if v.builds else f"no: {'; '.join(v.errors)}", "yes" if v.requested else "no")
            for v in verdicts]
    lines = ["## TensorRT (checked from the graph, without a GPU)", "",
             _table(("release", "builds natively", "exported for"), rows), "",
             f"This artifact builds on: {builds_on(verdicts)}."]
    for v in verdicts:
        if not v.builds and v.target in commands.retarget:
            lines += ["", f"For {v.label}, export for that release (the opset and graph follow):", "",
                      f"    {commands.retarget[v.target]}"]
    engine = m.tensorrt
    if engine and engine.file:
        lines += ["", f"Engine: `{engine.file}` ({engine.precision}, built in {engine.build_seconds} s)."]
    elif engine:
        lines += ["", "No engine was built here; on the device (absolute paths: runs from any folder):", "",
                  f"    {engine.trtexec}"]
    return "\n".join(lines)


def _files(folder: Path) -> list[tuple[str, int | None]]:
    """The folder's files and sizes, with the report and manifest (written later: size unknown), in
    ``FILE_ROLES`` order."""
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    files.update({name: None for name in (MANIFEST, REPORT, PLOT) if name not in files})
    order = list(FILE_ROLES)
    return sorted(files.items(), key=lambda item: (order.index(item[0]) if item[0] in order else len(order), item[0]))


def _files_section(files: Sequence[tuple[str, int | None]], timed: bool) -> str:
    roles = FILE_ROLES if timed else {**FILE_ROLES, PLOT: "tokens per block"}  # it describes only what ran
    lines = ["## Files", ""]
    for name, size in files:
        where = f" ({size / 2**20:.1f} MiB)" if size and size > 2**20 else ""
        lines.append(f"- `{name}`{where}: {roles.get(name, 'written by this export')}")
    return "\n".join(lines)


def _notes(notes: Sequence[str]) -> str:
    return "## Notes\n\n" + "\n".join(f"- {note}" for note in notes) if notes else ""


def _reproduce(commands: ReportCommands) -> str:
    if not commands.reproduce:
        return ""
    blocks = [f"{label}:\n\n    {command}" for label, command in commands.reproduce.items()]
    return "## Reproduce\n\n" + "\n\n".join(blocks)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows])
