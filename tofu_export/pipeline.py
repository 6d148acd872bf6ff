"""Checkpoint -> ToFu-patched static model -> verified ONNX (-> ORT model, TensorRT engine) in an artifact folder."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tofu_export.accounting import token_schedule
from tofu_export.artifacts import staged_folder, write_manifest
from tofu_export.config import ExportConfig, TrtConfig
from tofu_export.exporters.onnx import export_onnx
from tofu_export.exporters.trt_check import check_tensorrt_compat
from tofu_export.manifest import Manifest, TofuRecord
from tofu_export.models.loading import load_model

ONNX_NAME, ORT_NAME, ENGINE_NAME, TIMING_CACHE = "model.onnx", "model.ort.onnx", "model.engine", "timing.cache"


@dataclass
class ExportOutcome:
    out_dir: Path
    manifest: Manifest
    engine_error: str | None = None  # set when the ONNX was written but the TensorRT engine could not be built


def run_export(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: ExportConfig,
    step: Callable[[str], None] = lambda _: None,
) -> ExportOutcome:
    """Run the whole export; ``step`` is told each stage's name (the CLI shows it as progress)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    step("reading checkpoint")
    loaded = load_model(
        checkpoint, arch=config.arch, img_size=config.tofu.img_size, trust_pickle=config.trust_pickle,
        allow_timm_name=False,
    )
    model, guess = loaded.model, loaded.arch
    config.tofu.resolve(model)  # an impossible r fails here, before anything is written

    step("patching with ToFu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = config.tofu.patch(model)
    notes = [str(w.message) for w in caught] + list(guess.notes)
    schedule = token_schedule(model, resolved.img_size)
    policy = config.tofu.policy

    engine_error = None
    with staged_folder(out_dir, force=config.force) as staging:
        step("exporting to ONNX and verifying parity")
        onnx_result = export_onnx(
            model, staging / ONNX_NAME, resolved.img_size, opset=config.onnx.opset, simplify=config.onnx.simplify,
            tolerance=config.onnx.tolerance, exporter=config.onnx.exporter,
        )
        notes += onnx_result.notes
        step("checking TensorRT compatibility")
        trt_report = check_tensorrt_compat(staging / ONNX_NAME, config.trt.targets)
        manifest = Manifest(
            command=config.command,
            input={"path": str(checkpoint), "sha256": loaded.sha256},
            arch={"name": guess.name, "kwargs": guess.kwargs, "reason": guess.reason},
            tofu=TofuRecord(
                mode=config.tofu.label, layer_modes=schedule.modes, r_requested=resolved.r, r=schedule.r,
                prop_attn=resolved.prop_attn, tokens=schedule.tokens,
                policy=None if policy is None else {"source": policy.source, "model": policy.model},
            ),
            img_size=list(schedule.img_size),
            gflops={"original": schedule.gflops_original, "tofu": schedule.gflops_reduced,
                    "ratio": schedule.flop_ratio},
            onnx={"file": ONNX_NAME, "opset": config.onnx.opset, "exporter": config.onnx.exporter,
                  "simplified": onnx_result.simplified, "input": onnx_result.input_name,
                  "output": onnx_result.output_name,
                  "parity": asdict(onnx_result.parity) if onnx_result.parity else None},
            tensorrt_check=trt_report.to_dict(),
            notes=notes,
        )
        if config.target == "ort":
            step("optimising for ONNX Runtime")
            manifest.ort = _ort_artifact(staging)
        elif config.target == "trt":
            step("building TensorRT engine")
            manifest.tensorrt, engine_error = _trt_artifact(staging, out_dir, config.trt)
        step("writing manifest")
        write_manifest(staging, manifest)
    return ExportOutcome(out_dir, manifest, engine_error)


def _ort_artifact(folder: Path) -> dict[str, Any]:
    """Save ORT's offline-optimised graph (extended level: portable across CPUs) and time it briefly."""
    from tofu_export.engines.ort import OrtRunner, create_session
    from tofu_export.profiling.timing import LatencyStats, time_callable

    create_session(folder / ONNX_NAME, optimization="extended", optimized_model_path=folder / ORT_NAME)
    runner = OrtRunner(folder / ORT_NAME, provider="cpu")
    samples = time_callable(lambda: runner.run(1), warmup=5, iters=20, budget_s=None)
    stats = LatencyStats.from_samples(samples, 1)
    return {"file": ORT_NAME, "quick_latency_ms": {"p50": stats.p50_ms, "p90": stats.p90_ms, "batch": 1,
                                                   "provider": "CPUExecutionProvider", "iters": stats.n}}


def _trt_artifact(folder: Path, out_dir: Path, options: TrtConfig) -> tuple[dict[str, Any], str | None]:
    """Build the engine in ``folder``; where TensorRT is missing, record the trtexec line (with the paths the
    artifacts will have in ``out_dir``) and return the error for the caller to report."""
    from tofu_export.exporters.tensorrt import TensorRTUnavailable, build_engine, read_image_input, trtexec_command

    image = read_image_input(folder / ONNX_NAME)
    command = trtexec_command(
        out_dir / ONNX_NAME, out_dir / ENGINE_NAME, fp16=options.fp16, min_batch=options.min_batch,
        opt_batch=options.opt_batch, max_batch=options.max_batch, input_name=image.name, input_shape_chw=image.chw,
        workspace_mib=int(options.workspace_gib * 1024), timing_cache=str(out_dir / TIMING_CACHE),
    )
    info: dict[str, Any] = {"precision": "fp16" if options.fp16 else "fp32", "trtexec": command,
                            "batch_range": [options.min_batch, options.opt_batch, options.max_batch]}
    try:
        started = time.perf_counter()
        build_engine(
            folder / ONNX_NAME, folder / ENGINE_NAME, fp16=options.fp16, min_batch=options.min_batch,
            opt_batch=options.opt_batch, max_batch=options.max_batch, workspace_gib=options.workspace_gib,
            timing_cache_path=folder / TIMING_CACHE,
        )
    except TensorRTUnavailable as error:
        info["file"] = None
        reason = str(error.__cause__ or "the tensorrt Python package could not be imported")
        return info, str(TensorRTUnavailable.for_build(out_dir / ONNX_NAME, command, reason))
    info.update(file=ENGINE_NAME, build_seconds=round(time.perf_counter() - started, 1))
    return info, None
