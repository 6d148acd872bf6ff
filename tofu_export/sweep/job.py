"""A sweep: export every (mode, r) point from one loaded model, time them on one backend (round-robin by default),
score them where images are given; write a table, JSON and plots.

The r = 0 graph does not depend on the mode, so it is one point, ``baseline``: exported, timed and scored once, and
the speed-ups are against it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tofu_export import __version__
from tofu_export.artifacts import ENGINE_NAME, ONNX_NAME, cached_artifact
from tofu_export.atomic import write_json_atomic, write_text_atomic
from tofu_export.config import ExportConfig, ToFuConfig
from tofu_export.engines.base import NOISE
from tofu_export.exporters.workers import WorkerDied, export_workers, run_jobs, weight_bytes
from tofu_export.jobs.profile import graph_runner, model_runner
from tofu_export.manifest import Manifest
from tofu_export.models.loading import LoadedModel, load_model
from tofu_export.output_paths import check_output_folder, is_sweep_folder
from tofu_export.pipeline import export_model
from tofu_export.profiling.device import load_average
from tofu_export.progress import format_seconds, tracker
from tofu_export.reports.sweep import flag_uncertain, sweep_markdown, sweep_row
from tofu_export.sweep.config import SweepConfig, estimate_seconds, sweep_points
from tofu_export.sweep.measure import time_alone, time_interleaved
from tofu_export.sweep.state import BASELINE, SweepError, SweepPoint, point_key, run_sweep

if TYPE_CHECKING:
    from tofu_export.profiling.images import TimingImages

STATE = "sweep_state.json"
__all__ = ["SweepConfig", "SweepResult", "run_sweep_job", "sweep_points"]
RANDOM_SEED = 0  # a timm name's random weights: the same on every run, so a resumed sweep matches its cache


@dataclass
class SweepResult:
    """What the sweep measured: its rows (``reports.sweep.sweep_row``), how, and the files written."""

    title: str
    rows: list[dict[str, Any]]
    caption: list[str]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "caption": self.caption, "rows": self.rows, "notes": self.notes,
                "files": [str(path) for path in self.files]}


def run_sweep_job(source: str, out: Path, config: SweepConfig, *, say: Callable[[str], None] = lambda _: None,
                  progress: bool = True) -> SweepResult:
    """Run (or resume) the sweep in ``out``; ``say`` is told the run-time estimate before the work starts."""
    check_output_folder(out, is_sweep_folder, what="sweep")  # new, empty, or a sweep's own; no file above it
    names, names_from = _class_names(config)  # zero-shot: named before anything is loaded
    scoring = [] if config.zero_shot is None else [config.zero_shot.note(len(names), names_from)]
    loaded = _load(source, config)
    classes = None
    if config.zero_shot is not None:  # classified against its own text tower's class embeddings, every point
        from tofu_export.jobs.evaluate import zero_shot_classes

        classes = zero_shot_classes(Path(source), loaded.sha256, names, config.zero_shot, arch=config.arch,
                                    trust_pickle=config.trust_pickle, notes=scoring)  # before any export
    digest = loaded.sha256 or f"timm:{source}:seed{RANDOM_SEED}"
    stated = f"{config.arch}:{config.num_heads}"  # what the caller said the checkpoint is
    config_key = f"{digest}:{stated}:{config.export_key()}:tofu-export {__version__}"  # a new release re-exports
    points = config.points()
    folders = {point: out / "artifacts" / point_key(point, config_key)[:16] for point in points}
    graph = ENGINE_NAME if config.backend.name == "trt" else ONNX_NAME
    to_export = [point for point in points if not cached_artifact(folders[point], graph)]
    # side by side in forked workers, one per core; a TensorRT engine builds on the GPU, one at a time
    workers = 1 if graph == ENGINE_NAME else export_workers(len(to_export), weight_bytes(loaded.model))
    forward_ms = _forward_ms(loaded)
    images = 0 if config.data is None else (config.limit or 500)
    load = load_average()
    busy = load[0] / (os.cpu_count() or 1) if load else 1.0
    estimate = estimate_seconds(config, to_export=len(to_export), forward_ms=forward_ms, images=images, busy=busy,
                                workers=workers)
    plural = "s" if len(points) != 1 else ""
    side = f", {workers} at a time" if workers > 1 else ""
    say(f"{len(points)} point{plural} ({len(to_export)} to export{side}), estimated {format_seconds(estimate)} "
        f"on this machine now (one forward pass {forward_ms:.0f} ms, load average {_load_text()})")

    def export_fn(point: SweepPoint) -> Path:
        folder = folders[point]
        if not cached_artifact(folder, graph):  # missing, or not the file its manifest records: export again
            export_config = ExportConfig(tofu=config.tofu_for(point), onnx=config.onnx, arch=config.arch,
                                         num_heads=config.num_heads, trust_pickle=config.trust_pickle, force=True,
                                         target="trt" if config.backend.name == "trt" else "onnx")
            outcome = export_model(loaded, folder, export_config)
            if outcome.engine_error:
                raise SweepError(outcome.engine_error)
        return folder / ONNX_NAME

    if workers > 1:
        _export_ahead(to_export, export_fn, workers, progress)
    timing = _timing_images(loaded, config)

    def profile_fn(onnx_path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {"gflops": Manifest.read(onnx_path.parent).gflops.tofu}
        if not config.interleave:  # timed now, alone; else with every other point once all are exported
            with _runner(loaded, config, onnx_path, timing) as runner:
                result["samples_ms"] = time_alone(runner, iters=config.iters, batch=config.batch)
        return result

    eval_fn = None
    if config.data is not None:
        from tofu_export.engines.ort import OrtRunner
        from tofu_export.evaluation import Reference, evaluate
        from tofu_export.evaluation.zero_shot import zero_shot_predictor, zero_shot_reference

        # the unreduced model's outputs, computed once for every point (zero-shot: as a classifier of the classes)
        reference = Reference.of(loaded.model) if classes is None else zero_shot_reference(loaded.model, classes)

        def eval_fn(onnx_path: Path) -> dict[str, Any]:
            runner = OrtRunner(onnx_path, threads=config.threads)
            runner = runner if classes is None else zero_shot_predictor(runner, classes)
            tofu = Manifest.read(onnx_path.parent).tofu  # the point, for the progress line
            label = f"{tofu.mode} r={max(tofu.r, default=0)}" if any(tofu.r) else "baseline"
            return evaluate(reference, runner, config.data, limit=config.limit, label=label).to_dict()

    records = run_sweep(points, state_path=out / STATE, export_fn=export_fn, profile_fn=profile_fn,
                        eval_fn=eval_fn, config_key=f"{config_key} | {config.measured_as()}", progress=progress)
    load_before = load_average()
    if config.interleave:
        _time_together(records, loaded, config, progress, timing)
    return _report(source, out, config, records, [load_before, load_average()], timing, scoring)


def _class_names(config: SweepConfig) -> tuple[list[str], str]:
    """``(names, where from)`` of the classes a zero-shot sweep scores; ``([], "")`` for any other sweep."""
    if config.zero_shot is None or config.data is None:
        return [], ""
    from tofu_export.class_names import class_names
    from tofu_export.evaluation.data import split_folders

    return class_names(config.data, split_folders(config.data)[1], config.zero_shot.names_file)


def _export_ahead(points: list[SweepPoint], export_fn: Callable[[SweepPoint], Path], workers: int,
                  progress: bool) -> None:
    """Export ``points`` side by side in ``workers`` forked workers (``exporters.workers``: an export is
    single-threaded for most of its time) before the sweep takes them in turn and finds them cached. Best effort:
    a point whose export fails here, or whose worker dies, is exported again in its turn, where the sweep reports
    its error as it always has (every earlier point saved first)."""
    label = f"sweep: exporting {len(points)} points, {workers} at a time"
    with tracker(label, len(points), enabled=progress) as bar, contextlib.suppress(WorkerDied):
        run_jobs([partial(_export_or_leave, export_fn, point) for point in points], workers, bar.advance)


def _export_or_leave(export_fn: Callable[[SweepPoint], Path], point: SweepPoint) -> None:
    """``export_fn(point)``; an error leaves the point to the sweep's own turn (an interruption still stops)."""
    with contextlib.suppress(Exception):
        export_fn(point)


def _timing_images(loaded: LoadedModel, config: SweepConfig) -> TimingImages | None:
    """What every point is timed on: a batch's worth of the images scored (their eval split), in the model's
    eval transform; without images, seeded noise (None)."""
    if config.data is None:
        return None
    from tofu_export.evaluation.data import split_folders
    from tofu_export.profiling.images import model_timing_images

    return model_timing_images(split_folders(config.data)[1], config.batch, loaded.model)


def _load(source: str, config: SweepConfig) -> LoadedModel:
    """The model, loaded once; a timm name gets seeded random weights (the same on every run)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return load_model(source, arch=config.arch, trust_pickle=config.trust_pickle, num_heads=config.num_heads)


def _forward_ms(loaded: LoadedModel) -> float:
    """One batch-1 forward pass of the unreduced model in PyTorch, in ms (after one untimed pass): the estimate's
    unit of work."""
    image = torch.zeros(1, 3, *loaded.family.img_size(loaded.model))  # any family's own size, not timm's attribute
    times = []
    with torch.inference_mode():
        loaded.model(image)
        for _ in range(3):
            started = time.perf_counter()
            loaded.model(image)
            times.append(time.perf_counter() - started)
    return min(times) * 1e3


def _load_text() -> str:
    load = load_average()
    return "unknown" if load is None else f"{load[0]:.1f}"


@contextlib.contextmanager
def _runner(loaded: LoadedModel, config: SweepConfig, onnx_path: Path, timing: TimingImages | None) -> Iterator[Any]:
    """The runner that times one point on the sweep's backend (PyTorch: the model patched as the manifest says),
    fed ``timing``'s images where there are any."""
    backend = config.backend
    if backend.runtime == "torch":
        import copy

        record = Manifest.read(onnx_path.parent).tofu
        model = copy.deepcopy(loaded.model)
        ToFuConfig(r=record.r_requested, mode=record.layer_modes, prop_attn=record.prop_attn).patch(model)
        runner = model_runner(model, backend, threads=config.threads)
    else:
        path = onnx_path.parent / ENGINE_NAME if backend.name == "trt" else onnx_path
        spinning = config.spinning and not config.interleave  # spinning workers steal the cores of the next point
        runner = graph_runner(path, backend, threads=config.threads, spinning=spinning)
    if timing is not None:
        runner.feed_images(timing.images)
    yield runner


def _time_together(records: list[dict[str, Any]], loaded: LoadedModel, config: SweepConfig, progress: bool,
                   timing: TimingImages | None) -> None:
    """Time every point round-robin in one process and put the samples into its record's profile."""
    with contextlib.ExitStack() as stack:
        runners = {record["key"]: stack.enter_context(_runner(loaded, config, Path(record["artifact"]), timing))
                   for record in records}
        with tracker(f"timing {len(runners)} points round-robin", config.iters, enabled=progress) as bar:
            samples = time_interleaved(runners, iters=config.iters, on_round=bar.advance, batch=config.batch)
    for record in records:
        record["profile"] = {**record["profile"], "samples_ms": samples[record["key"]]}


def _report(source: str, out: Path, config: SweepConfig, records: list[dict[str, Any]],
            loads: list[list[float] | None], timing: TimingImages | None, notes: list[str]) -> SweepResult:
    """Rows, caption, sweep.md, sweep.json (with ``notes``: how the points were scored) and the plots (a Pareto plot
    only where there is a front)."""
    from tofu_export.reports.plots import plot_latency_vs_r, plot_pareto

    base = next((r["profile"]["samples_ms"] for r in records if r["mode"] == BASELINE), None)
    rows = [sweep_row(record, base, config.interleave, config.batch) for record in records]
    flag_uncertain(rows)
    caption = sweep_caption(config, rows, loads, NOISE if timing is None else timing.description)
    result = SweepResult(f"ToFu sweep of {source}", rows, caption, notes=list(notes))
    how_scored = [f"Scored: {note}" for note in notes]  # a person reads the .md: how the accuracies were measured
    result.files += [write_text_atomic(out / "sweep.md", sweep_markdown(rows, result.title, [*caption, *how_scored])),
                     write_json_atomic(out / "sweep.json", {"source": source, **result.to_dict()}),
                     plot_latency_vs_r(rows, out / "latency_vs_r.png", note=plot_note(config, rows, loads))]
    scores = [row.get("accuracy", row.get("cosine")) for row in rows]
    if any(score is None for score in scores):
        result.notes.append("no Pareto plot: the points were not scored (give an image folder to score them)")
    elif max(scores) - min(scores) < 1e-9 or len(rows) < 2:
        result.notes.append("no Pareto plot: every point scores the same here (random weights give no front)")
    else:
        front = [dict(row, accuracy=row.get("accuracy", row.get("cosine"))) for row in rows]
        result.files.append(plot_pareto(front, out / "pareto.png"))
    return result


def plot_note(config: SweepConfig, rows: list[dict[str, Any]], loads: list[list[float] | None]) -> str:
    """``ONNX Runtime CPU, 30 rounds round-robin, whiskers p10-p90, load 2.1``"""
    load = max((value[0] for value in loads if value), default=None)
    order = "round-robin" if config.interleave else "one point after another"
    return (f"{config.backend.label}, batch {config.batch}, {rows[0]['rounds'] if rows else 0} runs {order}, "
            "whiskers p10-p90"
            + (f", load {load:.1f}" if load is not None else ""))


def sweep_caption(config: SweepConfig, rows: list[dict[str, Any]], loads: list[list[float] | None],
                  timed_on: str = NOISE) -> list[str]:
    """How the table was measured, in words: backend, rounds, order, what the runs were fed, spread, load, and what
    the flag means."""
    rounds = rows[0]["rounds"] if rows else 0
    how = ("round-robin in one process (a fresh random order every round), speed-ups are per-round ratios"
           if config.interleave else "each point alone, one after another (speed-up spread: unpaired)")
    load = " -> ".join(f"{value[0]:.1f}" for value in loads if value) or "unknown"
    lines = [f"Batch-{config.batch} latency on {config.backend.label}, {rounds} timed runs per point, {how}, on "
             f"{timed_on}; figures are medians with the 10th-90th percentile; load average {load} (1 min, before "
             "-> after timing)."]
    if any(row["uncertain"] for row in rows):
        lines.append(UNCERTAIN_NOTE)
    return lines


UNCERTAIN_NOTE = ("rank ~: this point's p10-p90 interval overlaps the next one's, so this run does not establish "
                  "their order; time again with more runs (iters) on a quieter machine.")
