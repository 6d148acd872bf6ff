"""The manifest's typed sections round-trip through JSON, reject what tofu-export did not write, and eval finds a
deployed artifact's reference checkpoint through it (checked by sha256)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tofu_export.evaluation import EvaluationError
from tofu_export.hashing import sha256_file
from tofu_export.jobs.evaluate import artifact_reference
from tofu_export.manifest import MANIFEST, Manifest, ManifestError, ParityRecord, QuickLook, TrtCheckRecord
from tofu_export.schedule import compact_r
from tofu_export.tensorrt.issues import TrtIssue

LAYER_NORM_8_5 = {"severity": "error", "target": "8.5", "op_type": "LayerNormalization", "node": "/blocks.0/norm1",
                  "message": "no importer before TensorRT 8.6"}
PARITY = {"batch_sizes": [1, 2], "max_abs_diff": 1e-6, "mean_abs_diff": 1e-7, "output_scale": 3.0,
          "images_within_tolerance": 1.0, "min_cosine": 0.9999, "top1_agreement": None, "tolerance": 1e-4, "ok": True}


def _data(checkpoint: str, sha256: str) -> dict:
    return {
        "tool": "tofu-export", "input": {"path": checkpoint, "sha256": sha256},
        "arch": {"name": "deit_tiny_patch16_224", "kwargs": {"depth": 2}, "reason": "inferred"},
        "tofu": {"mode": "tofu", "layer_modes": ["mlerp", "mlerp"], "r_requested": [8, 8], "r": [8, 6],
                 "prop_attn": True, "tokens": [17, 9], "policy": None},
        "img_size": [64, 64], "gflops": {"original": 2.0, "tofu": 1.0, "ratio": 2.0},
        "onnx": {"file": "model.onnx", "opset": 17, "exporter": "dynamo", "simplified": True, "input": "image",
                 "output": "logits", "parity": PARITY},
        "tensorrt_check": {"per_target": {"8.5": False, "10": True}, "issues": [LAYER_NORM_8_5],
                           "targets": ["8.5", "10"], "build_for": ["10"], "ok": False, "opset": 17,
                           "op_counts": {"Add": 3}},
        "quick_look": {"label": "quick look", "machine": {"cpu": "cpu", "cores": 2},
                       "gflops": {"baseline": 2.0, "tofu": 1.0}, "latency": None,
                       "fidelity": {"images": 3, "cosine_mean": 0.99, "cosine_min": 0.98}},
        "a_newer_field": "ignored",
    }


def test_sections_are_typed_and_round_trip() -> None:
    manifest = Manifest.from_dict(_data("model.pth", "ab" * 32))
    assert isinstance(manifest.onnx.parity, ParityRecord) and manifest.onnx.parity.max_abs_diff == 1e-6
    assert isinstance(manifest.tensorrt_check, TrtCheckRecord) and manifest.tensorrt_check.requested == ["10"]
    assert manifest.tensorrt_check.issues == [TrtIssue(**LAYER_NORM_8_5)]  # typed on creation
    assert isinstance(manifest.quick_look, QuickLook) and manifest.quick_look.latency is None
    assert manifest.quick_look.fidelity.top1_agreement is None and manifest.tofu.clipped == [1]
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest and "a_newer_field" not in manifest.to_dict()


def test_what_tofu_export_did_not_write_is_refused() -> None:
    with pytest.raises(ManifestError, match="not a tofu-export manifest"):
        Manifest.from_dict({**_data("m", "s"), "tool": "other"})
    broken = _data("m", "s")
    del broken["onnx"]["opset"]
    with pytest.raises(ManifestError, match="OnnxRecord section lacks or mistypes a field"):
        Manifest.from_dict(broken)
    with pytest.raises(ManifestError, match="ParityRecord section is not an object"):
        Manifest.from_dict({**_data("m", "s"), "onnx": {**_data("m", "s")["onnx"], "parity": [1]}})
    issue = {key: value for key, value in LAYER_NORM_8_5.items() if key != "message"}
    with pytest.raises(ManifestError, match="TrtCheckRecord lists a malformed issue"):
        Manifest.from_dict({**_data("m", "s"), "tensorrt_check": {**_data("m", "s")["tensorrt_check"],
                                                                  "issues": [issue]}})


def test_a_manifest_read_if_any_is_none_where_there_is_no_readable_one(tmp_path: Path) -> None:
    import os

    assert Manifest.read_if_any(tmp_path) is None  # none
    (tmp_path / MANIFEST).write_text(json.dumps(_data("m", "s")))
    assert Manifest.read_if_any(tmp_path) == Manifest.from_dict(_data("m", "s"))
    (tmp_path / MANIFEST).write_text("{not json")
    assert Manifest.read_if_any(tmp_path) is None  # damaged
    (tmp_path / MANIFEST).write_text(json.dumps({**_data("m", "s"), "tool": "other"}))
    assert Manifest.read_if_any(tmp_path) is None  # not tofu-export's
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / MANIFEST)
    assert Manifest.read_if_any(fifo) is None  # not opened: reading it would block


def _artifact(tmp_path: Path, checkpoint: Path, sha256: str | None = None) -> Path:
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"graph")
    data = _data(str(checkpoint), sha256 or sha256_file(checkpoint))
    (folder / MANIFEST).write_text(json.dumps(data))
    return folder / "model.onnx"


def test_eval_takes_the_reference_from_the_manifest(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    path, mode, r, _ = artifact_reference(_artifact(tmp_path, checkpoint), None)
    assert (path, mode, r) == (checkpoint, "tofu", [8, 6])  # the plan's r, not the requested


def test_eval_refuses_a_checkpoint_that_is_not_the_recorded_one(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    onnx = _artifact(tmp_path, checkpoint, sha256="0" * 64)
    with pytest.raises(EvaluationError, match="sha256 differs") as caught:
        artifact_reference(onnx, None)
    assert caught.value.hint.option == "reference"
    assert artifact_reference(onnx, checkpoint)[0] == checkpoint  # a named reference is the user's call
    checkpoint.unlink()
    with pytest.raises(EvaluationError, match="is not there"):
        artifact_reference(onnx, None)


def test_without_a_manifest_the_reference_must_be_named(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"graph")
    with pytest.raises(EvaluationError, match="without a tofu-export manifest"):
        artifact_reference(tmp_path / "model.onnx", None)


def test_per_block_r_is_printed_run_length() -> None:
    assert compact_r([16] * 11 + [10]) == "16 x11, 10"
    assert compact_r([8, 6]) == "8, 6" and compact_r([0] * 3) == "0 x3"


def test_a_quick_look_speedup_whose_rounds_straddle_one_is_not_established() -> None:
    from tofu_export.reports.artifact import quick_look_rows

    spread = {"p50_ms": 11.0, "p10_ms": 10.0, "p90_ms": 50.0, "min_ms": 9.0, "max_ms": 60.0, "rounds": 38}
    latency = {"baseline": {**spread, "p50_ms": 11.4}, "tofu": spread, "speedup": 1.03,
               "speedup_per_round": {"p10": 0.77, "p90": 1.40}, "load": [10.9, 5.0, 2.0]}
    quick = QuickLook.from_dict({"label": "q", "machine": {}, "gflops": {"baseline": 2.0, "tofu": 1.0},
                                 "latency": latency})
    rows = {label: ours for label, _, ours in quick_look_rows(quick)}
    assert rows["speed-up per round"] == "1.03x (p10-p90 0.77-1.40x), not established"


def test_a_denoiser_step_folder_is_named_for_what_it_is(tmp_path: Path) -> None:
    """`tofu-export denoiser` writes a manifest of its own kind: eval and the rest say what the folder holds instead
    of listing the encoder manifest's missing fields."""
    (tmp_path / MANIFEST).write_text(json.dumps({"tool": "tofu-export", "kind": "denoiser-step", "files": []}))
    with pytest.raises(ManifestError, match="holds a denoiser step"):
        Manifest.read(tmp_path)
