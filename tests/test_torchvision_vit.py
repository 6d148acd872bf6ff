"""torchvision's ``VisionTransformer`` weights load as the timm ViT of the same shape: the same outputs as
torchvision's own model, its eval transform, its head count stated by the shape's timm model (or by --num-heads
where torchvision's models have no such width), older key names too; and the parity gate takes two zero outputs (a
zero-initialised head's) as agreeing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from tofu_export import load_model  # noqa: E402
from tofu_export.checkpoint import CheckpointError  # noqa: E402
from tofu_export.exporters.parity import row_cosines  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def _torchvision(width: int, heads: int, path: Path, rename_mlp: bool = False) -> torch.nn.Module:
    """A seeded torchvision ViT (2 layers, 32 px, patch 16, a random head) saved to ``path``; the model."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=heads,
                                                 hidden_dim=width, mlp_dim=4 * width, num_classes=7).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    state = model.state_dict()
    if rename_mlp:  # torchvision before 0.14 named the MLP's layers linear_1 / linear_2
        state = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    torch.save(state, path)
    return model


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("rename_mlp", [False, True])
def test_a_torchvision_vit_is_the_timm_vit_of_its_shape(tmp_path: Path, rename_mlp: bool) -> None:
    theirs = _torchvision(768, 12, tmp_path / "vit.pth", rename_mlp)
    loaded = load_model(tmp_path / "vit.pth")
    assert loaded.family.name == "timm" and loaded.arch.name == "vit_base_patch16_224"
    assert loaded.arch.kwargs["num_heads"] == 12 and "torchvision" in loaded.arch.provenance["num_heads"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_images()), theirs(_images()), rtol=1e-4, atol=1e-4)  # rounding:
    # torchvision's fused attention against timm's; a weight mapped wrongly moves outputs of ~10 by ~1
    cfg = loaded.model.pretrained_cfg
    assert (cfg["mean"], cfg["interpolation"]) == ((0.485, 0.456, 0.406), "bicubic")  # 32 px: not the 224 one


def test_a_width_torchvision_has_no_model_of_needs_its_head_count(tmp_path: Path) -> None:
    theirs = _torchvision(64, 4, tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="64-wide ViT checkpoint does not state its head count"):
        load_model(tmp_path / "small.pth")
    loaded = load_model(tmp_path / "small.pth", num_heads=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_images()), theirs(_images()), rtol=1e-4, atol=1e-4)


def test_two_zero_outputs_agree_and_one_does_not() -> None:
    zero, one = np.zeros((1, 3)), np.ones((1, 3))
    assert row_cosines(zero, zero).tolist() == [1.0] and row_cosines(zero, one).tolist() == [0.0]
    assert row_cosines(one, 2 * one).tolist() == pytest.approx([1.0])
