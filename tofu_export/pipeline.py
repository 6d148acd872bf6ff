"""Checkpoint -> ToFu-patched static model -> verified ONNX (-> ORT model, TensorRT engine) in an artifact folder."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tofu_export.accounting import token_schedule
from tofu_export.artifacts import staged_folder, write_manifest
from tofu_export.checkpoint import build_model, load_state_dict, sha256_file
from tofu_export.exporters.onnx import export_onnx
from tofu_export.exporters.trt_check import check_tensorrt_compat
from tofu_export.merge import max_reduction
from tofu_export.models.timm_vit import num_tokens, patch
from tofu_export.schedule import RSpec, ScheduleError, parse_r

Target = Literal["onnx", "ort", "trt"]
ONNX_NAME, ORT_NAME, ENGINE_NAME, TIMING_CACHE = "model.onnx", "model.ort.onnx", "model.engine", "timing.cache"


@dataclass
class ExportOptions:
    """Everything ``tofu-export export`` can be told. Defaults are the CLI's defaults."""

    r: RSpec = 16
    mode: str = "tofu"
    prune_layers: int | None = None
    prop_attn: bool = True
    arch: str | None = None
    img_size: int | None = None
    target: Target = "onnx"
    opset: int = 17
    simplify: bool = True
    tolerance: float = 1e-4
    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    workspace_gib: float = 2.0
    trust_pickle: bool = False
    force: bool = False
    trt_targets: tuple[str, ...] = ("8.5", "10")


@dataclass
class ExportOutcome:
    out_dir: Path
    manifest: dict[str, Any]
    engine_error: str | None = None  # set when the ONNX was written but the TensorRT engine could not be built


def check_r_possible(model: Any, r: RSpec, img_size: int | None) -> list[int]:
    """Reject an r no block could ever remove (more than half the first block's tokens); return the r list."""
    depth = len(model.blocks)
    values = parse_r(r, depth)
    n = num_tokens(model, img_size)
    limit = max_reduction(n, model.num_prefix_tokens)
    if values and values[0] > limit:
        raise ScheduleError(
            f"r={values[0]} is impossible for this model at this input size: the first block receives {n} tokens "
            f"({model.num_prefix_tokens} protected) and one bipartite matching step removes at most {limit}. "
            f"Use --r {limit} or less (typical: 8-16 for 224px ViT-S/B)."
        )
    return values


def run_export(
    checkpoint: str | Path,
    out_dir: str | Path,
    options: ExportOptions,
    step: Callable[[str], None] = lambda _: None,
) -> ExportOutcome:
    """Run the whole export; ``step`` is told each stage's name (the CLI shows it as progress)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    step("reading checkpoint")
    digest = sha256_file(checkpoint)
    state_dict = load_state_dict(checkpoint, trust_pickle=options.trust_pickle)
    model, guess = build_model(state_dict, arch=options.arch, img_size=options.img_size)
    img_size = options.img_size or int(model.patch_embed.img_size[0])
    r_requested = check_r_possible(model, options.r, img_size)

    step("patching with ToFu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch(model, options.r, options.mode, options.prop_attn, img_size, prune_layers=options.prune_layers)
    notes = [str(w.message) for w in caught] + list(guess.notes)
    schedule = token_schedule(model, img_size)

    engine_error = None
    with staged_folder(out_dir, force=options.force) as staging:
        step("exporting to ONNX and verifying parity")
        onnx_result = export_onnx(
            model, staging / ONNX_NAME, img_size, opset=options.opset, simplify=options.simplify,
            tolerance=options.tolerance,
        )
        notes += onnx_result.notes
        step("checking TensorRT compatibility")
        trt_report = check_tensorrt_compat(staging / ONNX_NAME, options.trt_targets)
        extra: dict[str, Any] = {}
        if options.target == "ort":
            step("optimising for ONNX Runtime")
            extra["ort"] = _ort_artifact(staging)
        elif options.target == "trt":
            step("building TensorRT engine")
            extra["tensorrt"], engine_error = _trt_artifact(staging, out_dir, options)
        manifest = {
            "tool": "tofu-export",
            "command": " ".join(sys.argv),
            "input": {"path": str(checkpoint), "sha256": digest},
            "arch": {"name": guess.name, "kwargs": guess.kwargs, "reason": guess.reason},
            "tofu": {
                "mode": options.mode,
                "layer_modes": schedule.modes,
                "r_requested": r_requested,
                "r": schedule.r,
                "prop_attn": options.prop_attn,
                "tokens": schedule.tokens,
            },
            "img_size": list(schedule.img_size),
            "gflops": {"original": schedule.gflops_original, "tofu": schedule.gflops_reduced,
                       "ratio": schedule.flop_ratio},
            "onnx": {"file": ONNX_NAME, "opset": options.opset, "simplified": onnx_result.simplified,
                     "input": onnx_result.input_name, "output": onnx_result.output_name,
                     "parity": asdict(onnx_result.parity) if onnx_result.parity else None},
            "tensorrt_check": trt_report.to_dict(),
            **extra,
            "notes": notes,
        }
        step("writing manifest")
        write_manifest(staging, manifest)
    return ExportOutcome(out_dir, manifest, engine_error)


def _ort_artifact(folder: Path) -> dict[str, Any]:
    """Save ORT's offline-optimised graph (extended level: portable across CPUs) and time it briefly."""
    import onnxruntime as ort

    from tofu_export.runtime.ort_backend import OrtBackend
    from tofu_export.runtime.stats import LatencyStats
    from tofu_export.runtime.timing import time_callable

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(folder / ORT_NAME)
    ort.InferenceSession(str(folder / ONNX_NAME), options, providers=["CPUExecutionProvider"])
    backend = OrtBackend(folder / ORT_NAME, provider="cpu")
    samples = time_callable(lambda: backend.run(1), warmup=5, iters=20, budget_s=None)
    stats = LatencyStats.from_samples(samples, 1)
    return {"file": ORT_NAME, "quick_latency_ms": {"p50": stats.p50_ms, "p90": stats.p90_ms, "batch": 1,
                                                   "provider": "CPUExecutionProvider", "iters": stats.n}}


def _trt_artifact(folder: Path, out_dir: Path, options: ExportOptions) -> tuple[dict[str, Any], str | None]:
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
