"""An exported graph is checked and timed without torch: on a machine that has ONNX Runtime but no torch (a
Jetson image, a deployment container), and, where torch is installed, without paying its import. ``profile`` of a
``model.onnx`` needed torch (the ONNX Runtime runner drew its random batch and the device description read the
GPU's name with it), and ``check`` imported it through ONNX Runtime's ``tools`` package, which does so whenever
torch is installed: 2 of ``check``'s 3 CPU-seconds on this VM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from commands import run_in_one_interpreter

from tofu_export.profiling.device import _cuda_gpu_name


def test_check_and_profile_of_an_onnx_file_need_no_torch(mixed_tofu_onnx: Path, tmp_path: Path) -> None:
    """``check`` with torch installed does not import it; ``profile`` runs where it is not installed at all."""
    commands = [(["check", str(mixed_tofu_onnx), "--trt", "10", "--costs", "--json"], True),
                (["profile", str(mixed_tofu_onnx), "--iters", "2", "--warmup", "1", "--json"], False)]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    check, profile_run = run_in_one_interpreter(commands, tmp_path, env)
    assert check.code == 0, check.stderr
    assert not check.torch_loaded, "check imported torch"
    report = json.loads(check.stdout)
    assert "symbolic shape inference failed" not in check.stdout  # ONNX Runtime's inference ran, not the fallback
    assert [block["block"] for block in report["reduction_costs"]["blocks"]] == [0, 1, 2, 3]
    assert profile_run.code == 0, profile_run.stderr
    profile = json.loads(profile_run.stdout)
    (batch,) = profile["batches"]
    assert batch["batch_size"] == 1 and batch["latency"]["n"] == 2, batch
    assert batch["breakdown"]["by_category_ms"]["token_reduction"] > 0, batch  # the op profiler found the reduction


def test_the_gpu_name_comes_from_the_driver_without_torch(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "torch")  # as if no runner had loaded it (restored after the test)
    assert _cuda_gpu_name(tmp_path / "absent") is None
    board = tmp_path / "gpus" / "0000:19:00.0"
    board.mkdir(parents=True)
    (board / "information").write_text("Model: \t\t NVIDIA H200\nIRQ:   \t\t 42\nGPU UUID: \t GPU-1234\n")
    assert _cuda_gpu_name(tmp_path / "gpus") == "NVIDIA H200"
    assert "torch" not in sys.modules
