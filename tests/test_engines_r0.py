"""r = 0 is the unreduced model: through the runners a ToFu-patched r = 0 candidate equals the reference exactly,
and every mode exports the same r = 0 graph (which is why a sweep exports, times and scores it once)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from tofu_export.engines.ort import OrtRunner
from tofu_export.engines.torch import TorchRunner
from tofu_export.exporters.onnx import export_onnx
from tofu_export.models.timm_vit import patch
from tofu_export.schedule import MODES
from tofu_export.sweep.job import sweep_points
from tofu_export.sweep.state import SweepPoint

pytestmark = pytest.mark.usefixtures("shared_traces")  # one dynamo trace per distinct model (trace_cache)

IMG = 32


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=2,
                             num_classes=7).eval()  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_r0_candidate_equals_reference_exactly_in_torch(mode: str) -> None:
    model, images = tiny_vit(), torch.randn(4, 3, IMG, IMG)
    candidate = patch(copy.deepcopy(model), r=0, mode=mode, img_size=IMG)
    assert torch.equal(TorchRunner(candidate)(images), TorchRunner(model)(images))


def test_r0_exports_of_every_mode_run_identically_in_onnx_runtime(tmp_path: Path) -> None:
    model, images = tiny_vit(), torch.randn(3, 3, IMG, IMG)
    outputs = {}
    for mode in MODES:
        candidate = patch(copy.deepcopy(model), r=0, mode=mode, img_size=IMG)
        outputs[mode] = OrtRunner(export_onnx(candidate, tmp_path / f"{mode}.onnx", IMG).path, threads=1)(images)
    first = outputs[MODES[0]].numpy()
    assert all(np.array_equal(first, output.numpy()) for output in outputs.values())
    torch.testing.assert_close(outputs[MODES[0]], TorchRunner(model)(images), atol=1e-4, rtol=0)


def test_sweep_points_share_one_baseline_across_modes() -> None:
    assert sweep_points(["tome", "tofu"], [0, 8, 16]) == [
        SweepPoint("baseline", 0), SweepPoint("tome", 8), SweepPoint("tome", 16), SweepPoint("tofu", 8),
        SweepPoint("tofu", 16),
    ]  # fmt: skip
    assert sweep_points(["tofu"], [8]) == [SweepPoint("tofu", 8)]
