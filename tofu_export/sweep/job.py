"""A sweep: export, profile (and score) every (mode, r) point; write a table, JSON and plots.

The r = 0 graph does not depend on the mode, so it is one point, ``baseline``: exported, timed and scored once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tofu_export import __version__
from tofu_export.artifacts import cached_artifact
from tofu_export.atomic import write_json_atomic, write_text_atomic
from tofu_export.config import ExportConfig, OnnxConfig, ToFuConfig
from tofu_export.engines.ort import OrtRunner
from tofu_export.errors import Hint
from tofu_export.hashing import sha256_file
from tofu_export.manifest import Manifest
from tofu_export.models.loading import load_model
from tofu_export.pipeline import ONNX_NAME, run_export
from tofu_export.policy import Policy
from tofu_export.profiling.compare import interleaved_latency_ms
from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.profiler import profile
from tofu_export.profiling.timing import LatencyStats
from tofu_export.reports.plots import BASELINE, plot_latency_vs_r, plot_pareto
from tofu_export.reports.sweep import sweep_markdown, sweep_row
from tofu_export.sweep.state import SweepPoint, point_key, progress_bar, run_sweep

STATE = "sweep_state.json"
POLICY = "policy"  # the mode name of a calibrated policy's point


def sweep_points(modes: Sequence[str], r_values: Sequence[int]) -> list[SweepPoint]:
    """The points to run: one ``baseline`` point for r = 0 (when asked for), then each mode's r > 0 points."""
    baseline = [SweepPoint(BASELINE, 0)] if 0 in r_values else []
    return baseline + [SweepPoint(mode, r) for mode in modes for r in r_values if r != 0]


def _checkpoint_file(source: str, out: Path, arch: str | None) -> Path:
    """A checkpoint path as is; a timm model name is saved once (random weights) so it can be exported."""
    if Path(source).exists():
        return Path(source)
    from safetensors.torch import save_file

    path = out / f"{source}.random.safetensors"
    if not path.exists():
        model = load_model(source, arch=arch).model
        out.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    return path


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


def run_sweep_job(
    source: str,
    out: Path,
    *,
    r_values: Sequence[int],
    modes: Sequence[str],
    device: str,
    data: Path | None,
    limit: int | None,
    iters: int,
    threads: int | None,
    spinning: bool = True,
    interleave: bool = False,
    arch: str | None,
    trust_pickle: bool,
    template: ToFuConfig | None = None,
    policy: Policy | None = None,
    onnx: OnnxConfig | None = None,
) -> list[Path]:
    """Run (or resume) the sweep in ``out``; returns the report files written. Every point is an exported ONNX
    graph timed on ONNX Runtime (CPU, or its CUDA provider); ``template`` carries the settings shared by all
    points (prune split, proportional attention); a calibrated ``policy`` adds one point, mode ``policy``, at its
    mean r; ``onnx`` how every point is exported (the exporter, opset)."""
    if device not in ("cpu", "cuda"):
        raise ProfilerError(f"a sweep runs on ONNX Runtime's cpu or cuda provider, not {device!r}",
                            hint=Hint("device", "cpu"))
    for mode in modes:  # an unknown mode fails here, before anything is exported (or a folder made)
        ToFuConfig(mode=mode)
    checkpoint = _checkpoint_file(source, out, arch)
    digest = sha256_file(checkpoint)
    template = template or ToFuConfig()
    onnx = onnx or OnnxConfig()
    settings = f"prune_layers={template.prune_layers}:prop_attn={template.prop_attn}:{onnx}"
    if policy is not None:  # a different policy file is a different graph
        settings += ":policy=" + hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()
    config_key = f"{digest}:{arch}:{settings}:tofu-export {__version__}"  # a new release re-exports
    points = sweep_points(modes, r_values)
    if policy is not None:
        points.append(SweepPoint(POLICY, round(sum(policy.r) / len(policy.r))))

    def export_fn(point: SweepPoint) -> Path:
        folder = out / "artifacts" / point_key(point, config_key)[:16]
        if not cached_artifact(folder, ONNX_NAME):  # missing, or not the file its manifest records: export again
            if point.mode == POLICY:
                tofu = dataclasses.replace(template, policy=policy)
            else:
                mode = modes[0] if point.mode == BASELINE else point.mode  # r = 0: the same graph in every mode
                tofu = dataclasses.replace(template, r=point.r, mode=mode)
            config = ExportConfig(tofu=tofu, onnx=onnx, arch=arch, trust_pickle=trust_pickle, force=True)
            run_export(checkpoint, folder, config)
        return folder / ONNX_NAME

    interleave = interleave and device == "cpu"

    def profile_fn(onnx_path: Path) -> dict[str, Any]:
        gflops = Manifest.read(onnx_path.parent).gflops.tofu
        if interleave:  # timed together with every other point once all are exported
            return {"gflops": gflops}
        provider = "cuda" if device == "cuda" else "cpu"
        runner = OrtRunner(onnx_path, threads=threads, provider=provider, spinning=spinning)
        result = profile(runner, batch_sizes=[1], warmup=5, iters=iters).batches[0].latency.to_dict()
        return {**result, "gflops": gflops}

    eval_fn = None
    if data is not None:
        from tofu_export.evaluation import evaluate

        reference = load_model(checkpoint, arch=arch, trust_pickle=trust_pickle).model

        def eval_fn(onnx_path: Path) -> dict[str, Any]:
            return evaluate(reference, OrtRunner(onnx_path, threads=threads), data, limit=limit).to_dict()

    # Finished points are reused only when they were measured the same way (exports are cached by config_key alone).
    timing = "interleaved" if interleave else f"threads={threads}, spinning={spinning}, iters={iters}"
    measured_as = f"{device}, {timing}, data={data}, limit={limit}"
    records = run_sweep(points, state_path=out / STATE, export_fn=export_fn, profile_fn=profile_fn,
                        eval_fn=eval_fn, config_key=f"{config_key} | {measured_as}")
    if interleave:
        _time_interleaved(records, threads=threads, iters=iters)
    rows = [sweep_row(record) for record in records]
    written = [
        write_text_atomic(out / "sweep.md", sweep_markdown(rows, f"ToFu sweep of {source}")),
        write_json_atomic(out / "sweep.json", {"source": source, "sha256": digest, "rows": rows}),
        plot_latency_vs_r(rows, out / "latency_vs_r.png"),
    ]
    if all("accuracy" in row for row in rows):
        written.append(plot_pareto(rows, out / "pareto.png"))
    return written
