"""Loaded model -> ToFu-patched static model -> verified ONNX (-> ORT model, TensorRT engine) in an artifact folder.

``export_model(loaded, out, config)`` does the work on a model already in memory (the sweep loads its model once and
exports every point from it); ``run_export(checkpoint, out, config)`` is the command's thin wrapper that reads the
checkpoint first. ``build_manifest`` assembles the manifest from what the steps returned.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from tofu_export.accounting import TokenSchedule, token_schedule
from tofu_export.artifacts import ENGINE_NAME, ONNX_NAME, ORT_NAME, check_output, staged_folder, write_manifest
from tofu_export.config import ExportConfig, OnnxConfig, ResolvedToFu, TrtConfig
from tofu_export.exporters.onnx import export_onnx
from tofu_export.exporters.precision import SYNTHETIC_IMAGES
from tofu_export.exporters.workers import export_workers, run_jobs, weight_bytes
from tofu_export.manifest import (
    ArchRecord,
    EngineRecord,
    GflopsRecord,
    InputRecord,
    Manifest,
    OnnxRecord,
    OrtRecord,
    PolicyRecord,
    QuickLook,
    TofuRecord,
)
from tofu_export.models.loading import LoadedModel, load_model
from tofu_export.quicklook import QuickLookSettings, export_baseline, image_files, load_images, run_quick_look
from tofu_export.reports.artifact import ReportCommands, clip_notes, write_report
from tofu_export.tensorrt.check import check_tensorrt_compat
from tofu_export.tensorrt.ops import ALL_TARGETS
from tofu_export.tensorrt.targets import export_opset

TIMING_CACHE = "timing.cache"
Step = Callable[[str], None]


@dataclass
class ExportOutcome:
    out_dir: Path
    manifest: Manifest
    engine_error: str | None = None  # set when the ONNX was written but the TensorRT engine could not be built


def run_export(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: ExportConfig,
    step: Step = lambda _: None,
    *,
    quick_look: QuickLookSettings | None = None,
    report_commands: ReportCommands | None = None,
) -> ExportOutcome:
    """Read ``checkpoint`` and export it (``export_model``); ``step`` is told each stage's name (CLI progress)."""
    out_state = check_output(Path(out_dir), force=config.force, inputs=[Path(checkpoint)])  # refused here, first
    step("reading checkpoint")
    loaded = load_model(Path(checkpoint), arch=config.arch, img_size=config.tofu.img_size,
                        trust_pickle=config.trust_pickle, num_heads=config.num_heads, allow_timm_name=False)
    return export_model(loaded, out_dir, config, step, quick_look=quick_look, report_commands=report_commands,
                        out_state=out_state, consume=True)


def export_model(
    loaded: LoadedModel,
    out_dir: str | Path,
    config: ExportConfig,
    step: Step = lambda _: None,
    *,
    quick_look: QuickLookSettings | None = None,
    report_commands: ReportCommands | None = None,
    out_state: Any = True,
    consume: bool = False,
) -> ExportOutcome:
    """Patch ``loaded.model`` with ``config.tofu``, export, check and describe it in the folder ``out_dir``.

    ``loaded.model`` is left unpatched (a copy is patched) unless ``consume``. ``quick_look``: also export the
    unreduced model and compare it with the ToFu graph, into the manifest's ``quick_look`` section;
    ``report_commands``: the command lines report.md lists (the caller knows its command line). ``out_state``: what
    ``artifacts.check_output`` found when the job started (True: check now).
    """
    out_dir = Path(out_dir)
    if out_state is True:
        out_state = check_output(out_dir, force=config.force, inputs=[loaded.path] if loaded.path else [])
    model = loaded.model if consume else copy.deepcopy(loaded.model)
    resolved = config.tofu.resolve(model)  # an impossible r or a foreign policy fails here, before anything is written
    images, calibration = _folder_images(model, quick_look, config.onnx)  # so does a folder that cannot be read
    baseline = copy.deepcopy(model) if quick_look is not None else None  # the unreduced model, for the quick look

    step("patching with ToFu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved.patch(model)
    notes = [*clip_notes(resolved.plan), *(str(w.message) for w in caught if "clipped" not in str(w.message)),
             *loaded.arch.notes]
    schedule = token_schedule(model, resolved.img_size)
    onnx_settings = {"opset": config.onnx.opset or export_opset(config.trt.targets),
                     "simplify": config.onnx.simplify, "tolerance": config.onnx.tolerance,
                     "exporter": config.onnx.exporter, "precision": config.onnx.precision,
                     "simplifier": config.onnx.simplifier,
                     "int8_symmetric": config.target != "ort"}  # TensorRT builds symmetric INT8 only

    engine_error = None
    looking = _quick_look_settings(quick_look, config, images) if baseline is not None else None
    with staged_folder(out_dir, force=config.force, expected=out_state) as staging, \
            tempfile.TemporaryDirectory(prefix="tofu-quick-look-") as tmp:
        jobs = [partial(export_onnx, model, staging / ONNX_NAME, resolved.img_size, **onnx_settings,
                        calibration=calibration)]
        if looking is not None:  # the quick look's unreduced graph, exported beside the ToFu one (exporters.workers)
            jobs.append(partial(export_baseline, baseline, Path(tmp) / "baseline.onnx", resolved.img_size,
                                **onnx_settings))
        step("exporting to ONNX and verifying parity" + ("; the unreduced model (r=0) for the quick look beside it"
                                                         if len(jobs) > 1 else ""))
        onnx_result, *baseline_export = run_jobs(jobs, export_workers(len(jobs), weight_bytes(model)))
        notes += onnx_result.notes
        step("checking TensorRT compatibility")
        trt_report = check_tensorrt_compat(staging / ONNX_NAME, ALL_TARGETS)  # every release: the report says which
        manifest = build_manifest(loaded, config, resolved, schedule, onnx_result, trt_report, notes)
        if config.target == "ort":
            step("optimising for ONNX Runtime")
            manifest.ort = _ort_artifact(staging)
        elif config.target == "trt":
            step("building TensorRT engine")
            manifest.tensorrt, engine_error = _trt_artifact(staging, out_dir, config.trt)
        if looking is not None and baseline is not None:
            manifest.quick_look = QuickLook.from_dict(run_quick_look(
                baseline, staging / ONNX_NAME, resolved.img_size, looking, gflops=manifest.gflops.to_dict(),
                onnx_settings=onnx_settings, images=images, step=step, exported=baseline_export[0],
            ))
        step("writing report.md")
        write_report(staging, manifest, report_commands)
        step("writing manifest")
        write_manifest(staging, manifest)
    return ExportOutcome(out_dir, manifest, engine_error)


def build_manifest(
    loaded: LoadedModel, config: ExportConfig, resolved: ResolvedToFu, schedule: TokenSchedule, onnx_result: Any,
    trt_report: Any, notes: list[str],
) -> Manifest:
    """The manifest of one export, from what its steps returned (files, versions and time are added on writing)."""
    policy = config.tofu.policy
    guess = loaded.arch
    parity = onnx_result.parity
    return Manifest(
        command=config.command,
        target=config.target,
        input=InputRecord(path=os.path.abspath(loaded.path) if loaded.path else "", sha256=loaded.sha256 or ""),
        arch=ArchRecord(name=guess.name, kwargs=guess.kwargs, reason=guess.reason, provenance=guess.provenance),
        tofu=TofuRecord(
            mode=config.tofu.label, layer_modes=schedule.modes, r_requested=list(resolved.r), r=schedule.r,
            prop_attn=resolved.prop_attn, tokens=schedule.tokens,
            policy=None if policy is None else PolicyRecord(source=policy.source, model=policy.model),
        ),
        img_size=list(schedule.img_size),
        gflops=GflopsRecord(original=schedule.gflops_original, tofu=schedule.gflops_reduced,
                            ratio=schedule.flop_ratio),
        onnx=OnnxRecord(file=ONNX_NAME, opset=onnx_result.opset, exporter=config.onnx.exporter,
                        simplified=onnx_result.simplified, input=onnx_result.input_name,
                        output=onnx_result.output_name, precision=config.onnx.precision,
                        simplifier=onnx_result.simplifier,
                        parity=None if parity is None else dataclasses.asdict(parity)),
        tensorrt_check=trt_report.record(build_for=config.trt.targets),
        notes=notes,
        preprocessing=_preprocessing(loaded.model, schedule.img_size),
    )


def _preprocessing(model: torch.nn.Module, img_size: tuple[int, int]) -> dict[str, Any]:
    """What a deployment must do to an RGB image before the graph of size ``img_size`` (timm's data config keys:
    ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``), as the model's family
    states it."""
    from tofu_export.evaluation.data import model_data_config

    config = {**model_data_config(model), "input_size": (3, *img_size)}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def _folder_images(
    model: torch.nn.Module, quick_look: QuickLookSettings | None, onnx: OnnxConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The quick look's images and an INT8 graph's calibration images, each ``[N, 3, H, W]`` in the model's eval
    transform, or None: without a folder, or for an FP32/FP16 graph (calibration: ``SYNTHETIC_IMAGES`` of its folder
    at most, evenly spread; no folder: synthetic images, with a note). ``--data`` alone names one folder for both:
    a file both take is decoded once."""
    uses = [  # (folder, pattern, limit), or None where that use has no folder
        None if quick_look is None or quick_look.data is None
        else (quick_look.data, quick_look.pattern, quick_look.max_images),
        None if onnx.precision != "int8" or onnx.calibration_data is None
        else (onnx.calibration_data, "*", SYNTHETIC_IMAGES),
    ]
    lists = [None if use is None else image_files(*use) for use in uses]
    files = list(dict.fromkeys(path for paths in lists if paths is not None for path in paths))  # in order, once
    if not files:
        return None, None
    from tofu_export.evaluation.data import model_transform

    decoded = load_images(files, model_transform(model))  # [F, 3, H, W]
    row = {path: i for i, path in enumerate(files)}
    quick, calibration = (None if paths is None else decoded[[row[path] for path in paths]] for paths in lists)
    return quick, calibration


def _quick_look_settings(
    settings: QuickLookSettings | None, config: ExportConfig, images: torch.Tensor | None
) -> QuickLookSettings | None:
    """What the quick look can measure for this target: a TensorRT engine is not timed on this CPU (its outputs
    are still compared, where images are at hand); None when nothing is left to measure."""
    if settings is None or config.target != "trt":
        return settings
    return dataclasses.replace(settings, timing=False) if images is not None else None


def _ort_artifact(folder: Path) -> OrtRecord:
    """Save ORT's offline-optimised graph (extended level: portable across CPUs)."""
    from tofu_export.engines.ort import create_session

    create_session(folder / ONNX_NAME, optimization="extended", optimized_model_path=folder / ORT_NAME)
    return OrtRecord(file=ORT_NAME, optimization="extended", provider="CPUExecutionProvider")


def _trt_artifact(folder: Path, out_dir: Path, options: TrtConfig) -> tuple[EngineRecord, str | None]:
    """Build the engine in ``folder``; where TensorRT is missing, record the trtexec line (with the absolute paths
    the artifacts will have in ``out_dir``, so it works from any folder) and return the error for the caller."""
    from tofu_export.tensorrt.api import TensorRTUnavailable
    from tofu_export.tensorrt.build import build_engine, read_image_input, trtexec_command

    out_abs = Path(os.path.abspath(out_dir))
    image = read_image_input(folder / ONNX_NAME)
    command = trtexec_command(out_abs / ONNX_NAME, out_abs / ENGINE_NAME, options, image, out_abs / TIMING_CACHE)
    info = EngineRecord(precision=image.precision if not options.fp16 else "fp16", trtexec=command,
                        batch_range=[options.min_batch, options.opt_batch, options.max_batch])
    try:
        started = time.perf_counter()
        build_engine(folder / ONNX_NAME, folder / ENGINE_NAME, options, timing_cache_path=folder / TIMING_CACHE)
    except TensorRTUnavailable as error:
        reason = str(error.__cause__ or "the tensorrt Python package could not be imported")
        return info, str(TensorRTUnavailable.for_build(out_abs / ONNX_NAME, command, reason))
    info.file, info.build_seconds = ENGINE_NAME, round(time.perf_counter() - started, 1)
    return info, None
