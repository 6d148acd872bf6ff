"""The export's images: the quick look's and an INT8 graph's calibration images come from one decoding pass, so that
``--precision int8 --data FOLDER`` (one folder for both) decodes each file once, and each use still gets exactly
the images it would take alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tofu_export import pipeline
from tofu_export.config import OnnxConfig
from tofu_export.evaluation.data import model_transform
from tofu_export.quicklook import QuickLookSettings, image_files, load_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 40x40 RGB images, two in each of three class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        (root / f"class{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"class{i % 3}" / f"{i}.png")
    return root


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """The file lists ``pipeline`` decodes, one per call."""
    calls: list[list[Path]] = []

    def spy(files, transform):
        calls.append(list(files))
        return load_images(files, transform)

    monkeypatch.setattr(pipeline, "load_images", spy)
    return calls


def test_one_folder_for_both_uses_decodes_each_file_once(make_vit, folder: Path, decoded) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=1, img_size=32)
    quick_look = QuickLookSettings(data=folder, max_images=4)
    quick, calibration = pipeline._folder_images(model, quick_look, OnnxConfig(precision="int8",
                                                                                calibration_data=folder))
    (files,) = decoded
    assert sorted(files) == image_files(folder) and len(set(files)) == 6  # 4 + 6 wanted, 6 decoded
    transform = model_transform(model)
    assert torch.equal(quick, load_images(image_files(folder, "*", 4), transform))
    assert torch.equal(calibration, load_images(image_files(folder), transform))


def test_each_use_alone_takes_only_its_images(make_vit, folder: Path, decoded) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=1, img_size=32)
    quick, calibration = pipeline._folder_images(model, QuickLookSettings(data=folder, max_images=2),
                                                 OnnxConfig(precision="fp32"))
    assert calibration is None and quick.shape == (2, 3, 32, 32)
    assert decoded == [image_files(folder, "*", 2)]
    quick, calibration = pipeline._folder_images(model, QuickLookSettings(), OnnxConfig(precision="int8"))
    assert quick is None and calibration is None and len(decoded) == 1  # no folder: nothing decoded
