"""report.md and report.png of an artifact folder: what they say is what the manifest holds."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from tofu_export.config import ExportConfig, ToFuConfig, TrtConfig
from tofu_export.manifest import Manifest, TofuRecord
from tofu_export.pipeline import run_export
from tofu_export.quicklook import QuickLookSettings
from tofu_export.reports.artifact import (
    ReportCommands,
    preprocessing_line,
    quick_look_caption,
    quick_look_rows,
    render_report,
    write_report,
)

pytestmark = pytest.mark.usefixtures("shared_traces")  # one dynamo trace per distinct model (trace_cache)

LAYER_NORM = {"target": "8.5", "severity": "error", "op_type": "LayerNormalization", "node": "/norm/ln",
              "message": "op has no native TensorRT importer"}  # fmt: skip


def _quick_look(*, classifier: bool = True, timed: bool = True) -> dict:
    base = {"p50_ms": 20.0, "p10_ms": 19.0, "p90_ms": 23.5, "min_ms": 18.0, "max_ms": 30.0, "rounds": 30}
    tofu = {"p50_ms": 12.5, "p10_ms": 12.0, "p90_ms": 14.0, "min_ms": 11.0, "max_ms": 16.0, "rounds": 30}
    latency = {"baseline": base, "tofu": tofu, "speedup": 1.6, "speedup_per_round": {"p10": 1.45, "p90": 1.75},
               "batch": 1, "provider": "CPUExecutionProvider", "threads": None, "order": "shuffled round-robin"}
    quick = {"label": "quick look on this machine, not a benchmark", "machine": {"cpu": "Test CPU", "cores": 2},
             "gflops": {"baseline": 4.6, "tofu": 2.3}, "baseline": {"r": 0, "parity_max_abs_diff": 1e-6},
             "fidelity": {"images": 20, "cosine_mean": 0.9912, "cosine_min": 0.95,
                          "top1_agreement": 0.85 if classifier else None, "data": "/data", "name": "20 samples"}}
    return {**quick, "latency": latency} if timed else quick


def _manifest(quick: dict | None, build_for: tuple[str, ...] = ("10",)) -> Manifest:
    return Manifest(
        input={"path": "model.pth", "sha256": "ab" * 32},
        arch={"name": "deit_small_patch16_224", "kwargs": {}, "reason": "inferred"},
        tofu=TofuRecord(mode="tofu", layer_modes=["prune", "mlerp", "mlerp"], r_requested=[16] * 3, r=[16] * 3,
                        prop_attn=True, tokens=[197, 181, 165]),
        img_size=[224, 224], gflops={"original": 4.6, "tofu": 2.3, "ratio": 2.0},
        onnx={"file": "model.onnx", "opset": 17, "exporter": "torchscript", "simplified": True, "input": "image",
              "output": "logits",
              "parity": {"batch_sizes": [1, 8], "max_abs_diff": 2e-6, "mean_abs_diff": 1e-7, "output_scale": 9.0,
                         "images_within_tolerance": 1.0, "min_cosine": 0.9999999, "top1_agreement": 1.0,
                         "tolerance": 1e-4, "ok": True}},
        tensorrt_check={"per_target": {"8.5": False, "10": True}, "issues": [LAYER_NORM], "targets": ["8.5", "10"],
                        "build_for": list(build_for)},
        quick_look=quick, command="tofu-export model.pth --r 16",
    )


COMMANDS = ReportCommands(reproduce={"This export": "tofu-export model.pth --r 16"},
                          retarget={"8.5": "tofu-export model.pth --r 16 --trt 8.5 -o out-trt8.5"})
FILES = [("model.onnx", 90 * 2**20), ("model.ort.onnx", 90 * 2**20), ("report.png", 4000), ("manifest.json", None)]


def test_report_names_every_file_and_the_verdict_per_release() -> None:
    text = render_report(_manifest(_quick_look()), COMMANDS, FILES)
    for name, _ in FILES:
        assert f"- `{name}`" in text
    assert "`model.onnx` (90.0 MiB)" in text
    assert "| TensorRT 10 (JetPack 6) | yes | yes |" in text
    assert "| TensorRT 8.5 (JetPack 5) | no: LayerNormalization: op has no native TensorRT importer | no |" in text
    assert "This artifact builds on: TensorRT 10 (JetPack 6)." in text
    assert "    tofu-export model.pth --r 16 --trt 8.5 -o out-trt8.5" in text
    assert "    tofu-export model.pth --r 16\n" in text


def test_no_retarget_advice_for_a_release_that_builds() -> None:
    manifest = _manifest(_quick_look())
    manifest.tensorrt_check = dataclasses.replace(manifest.tensorrt_check, per_target={"8.5": True, "10": True},
                                                  issues=[])
    text = render_report(manifest, COMMANDS, FILES)
    assert "--trt 8.5" not in text
    assert "This artifact builds on: TensorRT 8.5 (JetPack 5), TensorRT 10 (JetPack 6)." in text


def test_quick_look_rows_are_the_manifest_figures() -> None:
    rows = {label: (base, tofu) for label, base, tofu in quick_look_rows(_manifest(_quick_look()).quick_look)}
    assert rows["latency p50"] == ("20.0 ms", "12.5 ms")
    assert rows["latency p10-p90"] == ("19.0-23.5 ms", "12.0-14.0 ms")
    assert rows["speed-up per round"] == ("1.00x", "1.60x (p10-p90 1.45-1.75x)")
    assert rows["GFLOPs"] == ("4.60", "2.30 (2.00x fewer)")
    assert rows["cosine to baseline"] == ("1", "mean 0.9912, min 0.9500, 20 images")
    assert rows["top-1 same as baseline"] == ("100%", "85%")


def test_latencies_under_10_ms_keep_two_decimals() -> None:
    """A tiny model's 0.58 and 0.63 ms both read "0.6 ms" beside a 0.92x speed-up."""
    quick = _quick_look()
    quick["latency"]["baseline"] |= {"p50_ms": 0.58, "p10_ms": 0.55, "p90_ms": 0.61}
    quick["latency"]["tofu"] |= {"p50_ms": 0.63, "p10_ms": 0.6, "p90_ms": 12.34}
    rows = {label: (base, tofu) for label, base, tofu in quick_look_rows(_manifest(quick).quick_look)}
    assert rows["latency p50"] == ("0.58 ms", "0.63 ms")
    assert rows["latency p10-p90"] == ("0.55-0.61 ms", "0.60-12.3 ms")


def test_the_parity_section_says_when_int8_was_checked_unfused() -> None:
    manifest = _manifest(None)
    assert "Q/DQ unfused" not in render_report(manifest, COMMANDS, FILES)  # ORT's default level: nothing to say
    assert "| inputs | seeded random images, batches 1, 8 |" in render_report(manifest, COMMANDS, FILES)
    manifest.onnx.parity.ort_optimization, manifest.onnx.parity.precision = "basic", "int8"
    text = render_report(manifest, COMMANDS, FILES)
    assert "| ONNX Runtime | Q/DQ unfused (the graph's INT8 arithmetic, as TensorRT runs it)" in text
    assert "| inputs | the INT8 calibration images, batches 1, 8 |" in text  # parity runs on what was calibrated on


def test_the_caption_names_the_cpu_and_its_vector_extensions() -> None:
    quick = _quick_look()
    assert quick_look_caption(_manifest(quick).quick_look) == (  # a manifest written before they were recorded
        "quick look on this machine, not a benchmark: Test CPU, 2 cores; ONNX Runtime CPU, batch 1 on seeded normal "
        "noise, 30 rounds, shuffled round-robin; images: 20 samples")  # a manifest from before the first image
    quick["machine"] = {**quick["machine"], "cpu_features": ["avx", "fma", "f16c"]}
    assert "Test CPU, 2 cores, SIMD avx fma f16c; ONNX" in quick_look_caption(_manifest(quick).quick_look)
    quick["machine"]["cpu_features"] = []
    assert "2 cores, SIMD none listed;" in quick_look_caption(_manifest(quick).quick_look)
    quick["latency"]["timed_on"] = "the first image"
    assert "batch 1 on the first image, 30 rounds" in quick_look_caption(_manifest(quick).quick_look)


def test_backbones_have_no_top1_row_and_untimed_targets_no_latency() -> None:
    quick = _manifest(_quick_look(classifier=False, timed=False)).quick_look
    labels = [label for label, _, _ in quick_look_rows(quick)]
    assert labels == ["GFLOPs", "cosine to baseline"]


def test_report_without_quick_look_says_so() -> None:
    text = render_report(_manifest(None), ReportCommands(), FILES)
    assert "Not run for this export" in text and "## Reproduce" not in text


def test_write_report_writes_the_markdown_and_a_png(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    paths = write_report(tmp_path, _manifest(_quick_look()), COMMANDS)
    assert sorted(p.name for p in paths) == ["report.md", "report.png"]
    text = (tmp_path / "report.md").read_text()
    assert "- `model.onnx`" in text and "- `report.png`" in text and "- `manifest.json`" in text
    with Image.open(tmp_path / "report.png") as two_panels:
        wide = two_panels.width
    write_report(tmp_path, _manifest(_quick_look(timed=False)), COMMANDS)
    with Image.open(tmp_path / "report.png") as one_panel:
        assert one_panel.format == "PNG" and one_panel.width < wide  # no latency: the tokens panel only


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt would build an engine here")
def test_trt_target_compares_outputs_but_does_not_time_on_this_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text('{"architecture": "deit_tiny_patch16_224"}')  # heads, block kind (#24)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray((torch.rand(70, 70, 3) * 255).byte().numpy()).save(images / f"{index}.png")
    config = ExportConfig(tofu=ToFuConfig(r=2), trt=TrtConfig(targets=("8.5",)), target="trt")
    outcome = run_export(tmp_path / "model.pth", tmp_path / "out", config, quick_look=QuickLookSettings(data=images))
    assert outcome.engine_error is not None
    quick = outcome.manifest.quick_look
    assert quick.latency is None and quick.fidelity.images == 3
    assert outcome.manifest.to_dict()["quick_look"].get("latency") is None
    assert outcome.manifest.onnx.opset == 16
    text = (tmp_path / "out" / "report.md").read_text()
    assert "outputs only (this target is not timed on this machine)" in text
    assert "No engine was built here; on the device (absolute paths: runs from any folder):" in text
    assert "trtexec " in text and f"--onnx={os.path.abspath(tmp_path / 'out' / 'model.onnx')}" in text
    assert "| TensorRT 8.5 (JetPack 5) | yes | yes |" in text
    # what a deployment must do to an image before the graph: DeiT's eval transform at the export's 64 px
    preprocessing = json.loads((tmp_path / "out" / "manifest.json").read_text())["preprocessing"]
    assert preprocessing == {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225], "crop_pct": 0.9, "crop_mode": "center"}
    assert ("| preprocessing | shorter side resized to 71 (bicubic), center crop 64x64, RGB / 255, mean (0.485, "
            "0.456, 0.406), std (0.229, 0.224, 0.225);") in text  # floor(64 / 0.9), as timm resizes
    transform = timm.data.create_transform(**preprocessing)  # the JSON form builds it, as the report says
    with Image.open(images / "0.png") as image:
        assert transform(image.convert("RGB")).shape == (3, 64, 64)
    assert [type(step).__name__ for step in transform.transforms][:2] == ["Resize", "CenterCrop"]
    assert transform.transforms[0].size == 71


def test_the_preprocessing_line_says_each_crop_mode_as_timm_builds_it() -> None:
    import timm.data

    base = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "input_size": [3, 32, 32]}
    lines = {mode: preprocessing_line({**base, "crop_pct": crop, "crop_mode": mode})
             for mode, crop in (("squash", 1.0), ("center", 0.875), ("border", 1.0))}
    assert lines["squash"].startswith("resized to 32x32, the aspect ratio not kept (bilinear), RGB / 255")  # no crop
    assert lines["center"].startswith("shorter side resized to 36 (bilinear), center crop 32x32, RGB / 255")
    assert lines["border"].startswith("longer side resized to 32, padded to a square (bilinear), RGB / 255")
    steps = {mode: [type(step).__name__ for step in timm.data.create_transform(
        **{**base, "crop_pct": crop, "crop_mode": mode}).transforms][:2]
        for mode, crop in (("squash", 1.0), ("center", 0.875), ("border", 1.0))}
    assert steps == {"squash": ["Resize", "CenterCrop"], "center": ["Resize", "CenterCrop"],
                     "border": ["ResizeKeepRatio", "CenterCropOrPad"]}  # what the words describe
