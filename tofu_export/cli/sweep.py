"""``tofu-export sweep CHECKPOINT``: export, time (and score) every (mode, r) point; one table, JSON and plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tofu_export.cli.options import (
    BackendOptions,
    JsonOption,
    ModelOptions,
    OnnxOptions,
    RuntimeOptions,
    ZeroShotOptions,
    parse_int_list,
)
from tofu_export.cli.output import console, library_warnings, print_json, print_line, print_table, warnings_note

if TYPE_CHECKING:
    from tofu_export.sweep.job import SweepResult


def sweep(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint, or a timm model name (random weights).")],
    model: ModelOptions,
    onnx: OnnxOptions,
    runtime: RuntimeOptions,
    backend: BackendOptions,
    zero_shot: ZeroShotOptions,
    r: Annotated[str, typer.Option("--r", help="r values, comma-separated (0: the unreduced baseline).")] = "0,8,16",
    modes: Annotated[str, typer.Option(help="Modes, comma-separated.")] = "tome,tofu",
    prune_layers: Annotated[
        int | None, typer.Option("--prune-layers", help="tofu points: leading blocks that prune instead of merging.")
    ] = None,
    prop_attn: Annotated[bool, typer.Option("--prop-attn/--no-prop-attn", help="Proportional attention.")] = True,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Add a point for this calibrated policy.json (mode 'policy').")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Image folder to score each point on (see `eval`).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many images.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (resumable).")] = Path("artifacts/sweep"),
    iters: Annotated[int, typer.Option(help="Timed runs (rounds) per point.")] = 30,
    batch: Annotated[int, typer.Option(
        help="Images per timed run. On a GPU, fewer tokens pay at larger batches (a ViT-S at r=16 on an H200: slower "
        "than the plain model at batch 1, 1.56-1.72x faster at 64).")] = 1,
    interleave: Annotated[
        bool,
        typer.Option(
            "--interleave/--no-interleave",
            help="Time all points round-robin in one process after exporting them (a fresh random order every "
            "round, each timed run right after an untimed one of the same point), so a slow spell of a shared "
            "machine hits every point alike and speed-ups are per-round ratios. --no-interleave times each point "
            "alone, right after its export.",
        ),
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Export and time every (mode, r) point, optionally score it; one table (speed-up and fidelity against the r=0
    baseline, with their spread), plus sweep.md, sweep.json and plots.

    The r = 0 point is the same graph in every mode: it is exported, timed and scored once, as the baseline. A
    point whose spread overlaps its neighbour's is flagged (~): this run does not establish their order. Points
    already finished in OUT/sweep_state.json are skipped, so an interrupted sweep resumes where it stopped; exports
    are cached in OUT/artifacts by content (checkpoint hash, mode, r, tool version).

    Examples:

      tofu-export sweep model.pth --r 0,8,16 --modes tome,tofu --data data/fashion-mnist --limit 500

      tofu-export sweep model.pth --backend ort-cuda --r 0,16 --iters 100 --batch 64

      tofu-export sweep clip-vit-b-32/ --r 0,4,8 --data data/fashion-mnist --zero-shot --limit 500
    """
    from tofu_export.config import ToFuConfig
    from tofu_export.policy import Policy

    runtime.check()
    r_values, template = tuple(parse_int_list(r, "r")), ToFuConfig(prune_layers=prune_layers, prop_attn=prop_attn)
    onnx_config, loaded_policy = onnx.build(), None if policy is None else Policy.load(policy)  # checked before torch
    from tofu_export.sweep.config import SweepConfig

    config = SweepConfig(
        r_values=r_values, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
        backend=backend.build(), iters=iters, batch=batch, threads=runtime.threads, spinning=runtime.spin,
        interleave=interleave, data=data, limit=limit, template=template, policy=loaded_policy, onnx=onnx_config,
        arch=model.arch,
        num_heads=model.num_heads, trust_pickle=model.trust_pickle, zero_shot=zero_shot.build(),
    )
    from tofu_export.sweep.job import run_sweep_job  # torch: once every option is known to be good

    say = (lambda _: None) if as_json else (lambda text: print_line(console, text, label="[dim]-[/] "))
    with library_warnings() as caught:
        result = run_sweep_job(checkpoint, out, config, say=say, progress=not as_json)
    note = warnings_note(caught)
    if note:
        result.notes.append(note.removeprefix("note: "))
    if as_json:
        print_json(result.to_dict())
        return
    print_sweep(result)


def print_sweep(result: SweepResult) -> None:
    """The files, the notes, then (last) the table that answers the sweep's question."""
    from rich.console import Console
    from rich.table import Table

    from tofu_export.reports.sweep import COLUMNS, shown_columns, table_cells

    stdout = Console()
    print_line(stdout, "files: " + ", ".join(str(path) for path in result.files))
    for note in result.notes:
        print_line(stdout, f"note: {note}")
    table = Table(title=result.title, caption=" ".join(result.caption), title_justify="left",
                  caption_justify="left")
    shown = shown_columns(result.rows)
    for index in shown:
        table.add_column(COLUMNS[index], justify="left" if index == 0 else "right")
    for row in result.rows:
        cells = table_cells(row)
        table.add_row(*(cells[index] for index in shown))
    print_table(stdout, table)
