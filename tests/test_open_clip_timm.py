"""open_clip towers that are a timm model alone (SigLIP's layout: ``TimmModel`` with ``timm_pool="map"``,
``timm_proj="none"``) load as that timm ``VisionTransformer``: the same numbers as open_clip's ``encode_image``,
only ``visual.*`` read, open_clip's eval transform, ToFu's patch with the MAP head weighing tokens by size; a
projection after the trunk, a pool the weights do not have, or a file that is not the config's tower is refused
before any weight is read.

The trunk is timm's ``test_vit3`` (width 96, 9 blocks, class token, MAP head, 160 px) under a tiny text tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from tofu_export import load_model  # noqa: E402
from tofu_export.checkpoint import CheckpointError  # noqa: E402
from tofu_export.models import open_clip_load  # noqa: E402
from tofu_export.models.family import patched  # noqa: E402
from tofu_export.models.open_clip_config import resolve_config  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

IMG = 160
TRUNK = {"image_size": IMG, "timm_model_name": "test_vit3", "timm_model_pretrained": False, "timm_pool": "map",
         "timm_proj": "none"}
CONFIG = {"embed_dim": 96, "vision_cfg": TRUNK,
          "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1}}
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}


def _hub(folder: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file({key: value.contiguous() for key, value in state.items()}, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": PREPROCESS}))
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """open_clip's model and its hub folder."""
    torch.manual_seed(0)
    model = open_clip.CLIP(**CONFIG).eval()
    return model, _hub(tmp_path_factory.mktemp("siglip") / "hub", model.state_dict(), CONFIG)


def _images() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def test_hub_folder_is_the_timm_trunk_with_open_clips_numbers_and_transform(
        clip: tuple[torch.nn.Module, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from PIL import Image

    from tofu_export.evaluation.data import model_transform

    reference, hub = clip
    monkeypatch.setattr(open_clip_load, "load_state_dict", None)  # safetensors: the whole-file reader is not used
    loaded = load_model(hub)
    assert type(loaded.model).__name__ == "VisionTransformer" and loaded.family.name == "timm"
    assert loaded.arch.name.startswith("open_clip:") and "test_vit3" in loaded.arch.provenance["architecture"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_images()), reference.encode_image(_images()), rtol=0, atol=0)
    theirs = open_clip.image_transform(IMG, is_train=False, mean=PREPROCESS["mean"], std=PREPROCESS["std"],
                                       resize_mode="squash", interpolation="bicubic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    torch.testing.assert_close(model_transform(loaded.model)(image), theirs(image), rtol=0, atol=1e-6)


def test_patched_trunk_pools_merged_tokens_by_size(clip: tuple[torch.nn.Module, Path]) -> None:
    model = load_model(clip[1]).model
    with torch.no_grad():
        plain = model(_images())
        with patched(model, r=4, mode="tofu", img_size=IMG):
            reduced = model(_images())
            tokens = model.forward_features(_images())  # [B, 101 - 9 * 4, C]; the sizes of the last block's tokens
            assert tokens.shape[1] == 101 - 9 * 4 and model._tofu.size.max() > 1
            weighted = model.forward_head(tokens)
            unweighted = model.head(model.fc_norm(type(model).pool(model, tokens)))  # timm's own MAP pool
    torch.testing.assert_close(weighted, reduced, rtol=0, atol=0)
    assert torch.nn.functional.cosine_similarity(reduced, plain).min() > 0.9
    assert (reduced - unweighted).abs().max() > 1e-4


@pytest.mark.parametrize(("change", "message"), [
    ({"timm_proj": "linear"}, "test_vit3 followed by a linear projection"),
    ({"timm_pool": "rot_attn", "timm_proj": ""}, r"followed by an attention pool \(rot_attn\)"),
])
def test_a_head_of_open_clips_after_the_trunk_is_refused_before_reading_weights(
        clip: tuple[torch.nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict,
        message: str) -> None:
    hub = _hub(tmp_path / "hub", {"visual.trunk.cls_token": torch.zeros(1, 1, 96)},
               {**CONFIG, "vision_cfg": {**TRUNK, **change}})
    monkeypatch.setattr(open_clip_load, "read_tower", None)  # reading a weight would fail the test
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(hub)
    assert caught.value.hint is not None and caught.value.hint.option == "arch"


def test_a_pool_the_weights_do_not_have_is_refused(clip: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    hub = _hub(tmp_path / "hub", clip[0].state_dict(), {**CONFIG, "vision_cfg": {**TRUNK, "timm_pool": "avg"}})
    with pytest.raises(CheckpointError, match="pools its timm model test_vit3 with 'avg'; the weights describe 'map'"):
        load_model(hub)


def test_open_clips_pretrained_preprocessing_goes_with_a_named_config(tmp_path: Path) -> None:
    """A config named by ``--arch`` carries the preprocessing all of open_clip's pretrained tags of it state."""
    config = resolve_config(tmp_path / "model.safetensors", "open_clip:ViT-B-16-SigLIP")
    assert config.timm_trunk == "vit_base_patch16_siglip_224"
    assert config.preprocess["resize_mode"] == "squash" and tuple(config.preprocess["mean"]) == (0.5, 0.5, 0.5)


def test_an_eva02_trunk_is_the_timm_eva(tmp_path: Path) -> None:
    """EVA-02 towers (``timm_pool="token"``, the trunk's own head as the projection) load through the Eva family."""
    config = {**CONFIG, "embed_dim": 48, "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                                                        "timm_pool": "token", "timm_proj": None}}
    torch.manual_seed(0)
    reference = open_clip.CLIP(**config).eval()
    loaded = load_model(_hub(tmp_path / "hub", reference.state_dict(), config))
    assert loaded.family.name == "timm_eva" and loaded.model.global_pool == "token"
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), reference.encode_image(images), rtol=0, atol=0)
