"""`tofu-export sweep`: export, profile (and score) every (mode, r) point; write a table, JSON and plots."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tofu_export import __version__
from tofu_export.atomic import write_json_atomic, write_text_atomic
from tofu_export.checkpoint import sha256_file
from tofu_export.pipeline import ONNX_NAME, ExportOptions, run_export
from tofu_export.runtime.compare import interleaved_latency_ms
from tofu_export.runtime.errors import ProfilerError
from tofu_export.runtime.ort_backend import OrtBackend
from tofu_export.runtime.plots import plot_latency_vs_r, plot_pareto
from tofu_export.runtime.profiler import profile
from tofu_export.runtime.stats import LatencyStats
from tofu_export.runtime.sweep import SweepPoint, point_key, progress_bar, run_sweep

STATE = "sweep_state.json"


def _checkpoint_file(source: str, out: Path, arch: str | None, load: Callable[..., Any]) -> Path:
    """A checkpoint path as is; a timm model name is saved once (random weights) so it can be exported."""
    if Path(source).exists():
        return Path(source)
    from safetensors.torch import save_file

    path = out / f"{source}.random.safetensors"
    if not path.exists():
        model = load(source, arch, None, False)
        out.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    return path


def _record_row(record: dict[str, Any]) -> dict[str, Any]:
    latency = record["profile"]
    row = {"mode": record["mode"], "r": record["r"], "latency_ms": latency["p50_ms"], "p90_ms": latency["p90_ms"],
           "images_per_s": latency["throughput_ips"], "gflops": latency["gflops"]}
    metrics = (record.get("eval") or {}).get("metrics", {})
    accuracy = metrics.get("candidate_top1", metrics.get("candidate_knn_top1"))
    if accuracy is not None:
        row["accuracy"] = accuracy
    if "cosine_mean" in metrics:
        row["cosine"] = metrics["cosine_mean"]
    return row


def _markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _time_interleaved(records: Sequence[dict[str, Any]], *, threads: int | None, iters: int) -> None:
    """Time every point's graph round-robin in one process (``interleaved_latency_ms``: spinning off, shuffled
    order), and add the stats to its profile.

    A slow spell of a shared machine then hits all points alike instead of the few timed during it.
    """
    paths = {record["key"]: Path(record["artifact"]) for record in records}
    with progress_bar() as bar:
        task = bar.add_task(f"timing {len(paths)} points round-robin", total=iters)
        samples = interleaved_latency_ms(
            paths, threads=threads, warmup=5, iters=iters, on_round=lambda: bar.advance(task)
        )
    for record in records:
        stats = LatencyStats.from_samples([ms / 1e3 for ms in samples[record["key"]]], batch_size=1)
        record["profile"] = {**record["profile"], **stats.to_dict()}


def run_cli_sweep(
    source: str,
    out: Path,
    *,
    r_values: Sequence[int],
    modes: Sequence[str],
    backend: str,
    device: str,
    data: Path | None,
    limit: int | None,
    iters: int,
    threads: int | None,
    spinning: bool = True,
    interleave: bool = False,
    arch: str | None,
    trust_pickle: bool,
    load: Callable[..., Any],
) -> list[Path]:
    """Run (or resume) the sweep in ``out``; returns the report files written."""
    if backend != "ort":
        raise ProfilerError("sweep profiles the exported ONNX graphs: use --backend ort (CPU, or --device cuda)")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _checkpoint_file(source, out, arch, load)
    digest = sha256_file(checkpoint)
    config_key = f"{digest}:{arch}:tofu-export {__version__}"  # a new release re-exports instead of reusing
    points = [SweepPoint(mode, r) for mode in modes for r in r_values]

    def export_fn(point: SweepPoint) -> Path:
        folder = out / "artifacts" / point_key(point, config_key)[:16]
        if not (folder / ONNX_NAME).exists():
            options = ExportOptions(r=point.r, mode=point.mode, arch=arch, trust_pickle=trust_pickle, force=True)
            run_export(checkpoint, folder, options)
        return folder / ONNX_NAME

    interleave = interleave and device == "cpu"

    def profile_fn(onnx_path: Path) -> dict[str, Any]:
        manifest = json.loads((onnx_path.parent / "manifest.json").read_text())
        if interleave:  # timed together with every other point once all are exported
            return {"gflops": manifest["gflops"]["tofu"]}
        provider = "cuda" if device == "cuda" else "cpu"
        runner = OrtBackend(onnx_path, threads=threads, provider=provider, spinning=spinning)
        result = profile(runner, batch_sizes=[1], warmup=5, iters=iters).batches[0].latency.to_dict()
        return {**result, "gflops": manifest["gflops"]["tofu"]}

    eval_fn = None
    if data is not None:
        from tofu_export.evaluation import OrtPredictor, evaluate

        reference = load(str(checkpoint), arch, None, trust_pickle)

        def eval_fn(onnx_path: Path) -> dict[str, Any]:
            return evaluate(reference, OrtPredictor(onnx_path, threads), data, limit=limit).to_dict()

    # Finished points are reused only when they were measured the same way (exports are cached by config_key alone).
    timing = "interleaved" if interleave else f"threads={threads}, spinning={spinning}, iters={iters}"
    measured_as = f"{device}, {timing}, data={data}, limit={limit}"
    records = run_sweep(points, state_path=out / STATE, export_fn=export_fn, profile_fn=profile_fn,
                        eval_fn=eval_fn, config_key=f"{config_key} | {measured_as}")
    if interleave:
        _time_interleaved(records, threads=threads, iters=iters)
    rows = [_record_row(record) for record in records]
    written = [
        write_text_atomic(out / "sweep.md", _markdown(rows, f"ToFu sweep of {source}")),
        write_json_atomic(out / "sweep.json", {"source": source, "sha256": digest, "rows": rows}),
        plot_latency_vs_r(rows, out / "latency_vs_r.png"),
    ]
    if all("accuracy" in row for row in rows):
        written.append(plot_pareto(rows, out / "pareto.png"))
    return written
