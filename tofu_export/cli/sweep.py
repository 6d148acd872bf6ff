"""``tofu-export sweep CHECKPOINT``: export, profile (and score) every (mode, r) point; table, JSON and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tofu_export.cli.options import ModelOptions, OnnxOptions, RuntimeOptions, parse_int_list


def sweep(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint, or a timm model name (random weights).")],
    model: ModelOptions,
    onnx: OnnxOptions,
    runtime: RuntimeOptions,
    r: Annotated[str, typer.Option("--r", help="r values, comma-separated.")] = "0,4,8,12,16",
    modes: Annotated[str, typer.Option(help="Modes, comma-separated.")] = "tome,prune,mlerp,tofu",
    prune_layers: Annotated[
        int | None, typer.Option("--prune-layers", help="tofu points: leading blocks that prune instead of merging.")
    ] = None,
    prop_attn: Annotated[bool, typer.Option("--prop-attn/--no-prop-attn", help="Proportional attention.")] = True,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Add a point for this calibrated policy.json (mode 'policy').")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (ONNX Runtime's CUDA provider).")] = "cpu",
    data: Annotated[Path | None, typer.Option(help="Image folder to score each point on (see `eval`).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many images.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (resumable).")] = Path("artifacts/sweep"),
    iters: Annotated[int, typer.Option(help="Timed runs per point.")] = 30,
    interleave: Annotated[
        bool,
        typer.Option(
            help="CPU: time all points round-robin in one process (spinning off, a fresh random order every "
            "round, each timed run right after an untimed one of the same point) after exporting them, so a slow "
            "spell of a shared machine hits every point alike and no point always runs on another's caches."
        ),
    ] = False,
) -> None:
    """Export and profile every (mode, r) point on ONNX Runtime, optionally score it; write a table, JSON, plots.

    The r = 0 point is the same graph in every mode: it is exported, timed and scored once, as the baseline.
    Points already finished in OUT/sweep_state.json are skipped, so an interrupted sweep resumes where it stopped.
    Exports are cached in OUT/artifacts by content (checkpoint hash, mode, r, tool version).

    Example: tofu-export sweep model.pth --r 0,8,16 --modes tome,tofu --data data/fashion-mnist --limit 500
    """
    from tofu_export.config import ToFuConfig
    from tofu_export.policy import Policy
    from tofu_export.sweep.job import run_sweep_job

    runtime.check()
    paths = run_sweep_job(
        checkpoint, out, r_values=parse_int_list(r, "r"), modes=[m.strip() for m in modes.split(",") if m.strip()],
        device=device, data=data, limit=limit, iters=iters, threads=runtime.threads,
        spinning=runtime.spin, interleave=interleave, arch=model.arch, trust_pickle=model.trust_pickle,
        template=ToFuConfig(prune_layers=prune_layers, prop_attn=prop_attn),
        policy=None if policy is None else Policy.load(policy), onnx=onnx.build(),
    )
    for path in paths:
        typer.echo(str(path))
