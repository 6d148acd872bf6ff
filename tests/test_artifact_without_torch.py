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

from commands import run_guarded

from tofu_export.profiling.device import _cuda_gpu_name

PROBE = r"""
import contextlib, io, json, sys
from tofu_export.cli import main
for args, torch_installed in json.loads(sys.argv[1]):
    if not torch_installed:
        sys.modules["torch"] = None  # what a machine without torch answers: import fails, find_spec is None
    sys.argv, out, err = ["tofu-export", *args], io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code
    print(json.dumps([code, out.getvalue(), err.getvalue(), sys.modules.get("torch") is not None]), flush=True)
"""


def test_check_and_profile_of_an_onnx_file_need_no_torch(mixed_tofu_onnx: Path, tmp_path: Path) -> None:
    """``check`` with torch installed does not import it; ``profile`` runs where it is not installed at all."""
    commands = [(["check", str(mixed_tofu_onnx), "--trt", "10", "--costs", "--json"], True),
                (["profile", str(mixed_tofu_onnx), "--iters", "2", "--warmup", "1", "--json"], False)]
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    done = run_guarded([sys.executable, "-c", PROBE, json.dumps(commands)], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    (check_code, check_out, check_err, torch_loaded), (profile_code, profile_out, profile_err, _) = (
        json.loads(line) for line in done.stdout.splitlines())
    assert check_code == 0, check_err
    assert not torch_loaded, "check imported torch"
    report = json.loads(check_out)
    assert "symbolic shape inference failed" not in check_out  # ONNX Runtime's inference ran, not the fallback
    assert [block["block"] for block in report["reduction_costs"]["blocks"]] == [0, 1, 2, 3]
    assert profile_code == 0, profile_err
    profile = json.loads(profile_out)
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
