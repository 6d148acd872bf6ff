"""A calibrated policy goes through every command's path: export (manifest), sweep (its own point), config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tofu_export.config import ExportConfig, OnnxConfig, ToFuConfig
from tofu_export.pipeline import run_export
from tofu_export.policy import Policy, PolicyError, model_record
from tofu_export.sweep.config import SweepConfig
from tofu_export.sweep.job import run_sweep_job

MODES, R = ("prune", "mlerp"), (3, 2)
ONNX = OnnxConfig(exporter="torchscript")  # the policy's path is the subject, not the exporter: 5x cheaper


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Policy]:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=5)
    path = tmp_path_factory.mktemp("policy") / "model.safetensors"
    save_file(model.state_dict(), str(path))
    (path.parent / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))  # heads, block
    return path, Policy(MODES, R, model_record(model, 64), source={"images": 0})


def test_export_applies_the_policy_and_records_it(tmp_path: Path, checkpoint: tuple[Path, Policy]) -> None:
    path, policy = checkpoint
    outcome = run_export(path, tmp_path / "out", ExportConfig(tofu=ToFuConfig(policy=policy), onnx=ONNX))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tofu"]["layer_modes"] == list(MODES)
    assert manifest["tofu"]["r"] == list(R)
    assert manifest["tofu"]["mode"] == "policy"
    assert manifest["tofu"]["policy"]["model"]["depth"] == 2
    assert outcome.manifest.tofu.tokens == [17, 14]


def test_a_foreign_policy_is_refused_before_any_export(tmp_path: Path, checkpoint: tuple[Path, Policy]) -> None:
    path, policy = checkpoint
    other = Policy(("mlerp",) * 3, (1, 1, 1), dict(policy.model, depth=3))
    with pytest.raises(PolicyError, match="blocks 2 \\(policy: 3\\)"):
        run_export(path, tmp_path / "out", ExportConfig(tofu=ToFuConfig(policy=other)))
    assert not (tmp_path / "out").exists()


def test_sweep_adds_one_policy_point(tmp_path: Path, checkpoint: tuple[Path, Policy]) -> None:
    path, policy = checkpoint
    run_sweep_job(str(path), tmp_path / "sweep", SweepConfig(r_values=(2,), modes=("tome",), iters=2, threads=1,
                                                             policy=policy, onnx=ONNX), progress=False)
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [(row["mode"], row["r"]) for row in rows] == [("tome", 2), ("policy", 2)]
    tome, policied = (row["gflops"] for row in rows)
    assert policied != tome  # the policy's graph (r 3 then 2) is not the tome r=2 graph
