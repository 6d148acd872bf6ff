"""#24 item 1: a timm checkpoint's architecture comes from evidence (weights, a config beside the file, or the
caller), never from a guess; every value says where it came from, and block kinds ToFu does not implement are
refused (res-post-norm, parallel, integer weights). More cases: test_arch_statement.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import ParallelThingsBlock, ResPostBlock, VisionTransformer

from tofu_export import load_model
from tofu_export.checkpoint import CheckpointError
from tofu_export.models.timm_vit_arch import infer_arch

pytestmark = pytest.mark.filterwarnings("ignore")


def _vit(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    base = dict(img_size=32, patch_size=16, depth=1, num_classes=0)
    return VisionTransformer(**{**base, **kwargs}).eval()


def _save(model: VisionTransformer, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_width_outside_the_table_needs_the_head_count(tmp_path: Path) -> None:
    path = _save(_vit(embed_dim=96, num_heads=4), tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="96-wide ViT checkpoint does not state its head count") as caught:
        load_model(path)
    hint = caught.value.hint
    assert hint is not None and hint.option == "num_heads" and hint.alternative is not None
    assert hint.alternative.option == "arch"
    loaded = load_model(path, num_heads=4)
    assert loaded.model.blocks[0].attn.num_heads == 4 and loaded.arch.provenance["num_heads"] == "given"
    with pytest.raises(CheckpointError, match="does not divide"):
        load_model(path, num_heads=5)


def test_1280_wide_vit_is_not_given_a_table_head_count() -> None:
    weights = _vit(embed_dim=1280, num_heads=16).state_dict()  # was embed_dim // 64 = 20, then a width table's 16
    with pytest.raises(CheckpointError, match="does not state its head count") as caught:
        infer_arch(weights)
    assert caught.value.hint is not None and caught.value.hint.option == "arch"
    assert caught.value.hint.alternative is not None and caught.value.hint.alternative.option == "num_heads"
    guess = infer_arch(weights, num_heads=16)
    assert guess.kwargs["num_heads"] == 16 and guess.provenance["num_heads"] == "given" and "16 heads" in guess.reason


def test_config_beside_the_checkpoint_states_the_heads(tmp_path: Path) -> None:
    source = _vit(embed_dim=384, num_heads=12)  # not the table's 6
    path = _save(source, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224",
                                                      "model_args": {"num_heads": 12}}))
    loaded = load_model(path)
    assert loaded.model.blocks[0].attn.num_heads == 12
    assert loaded.arch.provenance["num_heads"] == "config.json model_args"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), source(images), rtol=0, atol=1e-6)


def test_qk_norm_weights_state_the_heads() -> None:
    guess = infer_arch(_vit(embed_dim=96, num_heads=3, qk_norm=True).state_dict())
    assert guess.kwargs["num_heads"] == 3 and guess.provenance["num_heads"].startswith("weights")


def test_every_value_has_a_provenance(tmp_path: Path) -> None:
    loaded = load_model(_save(_vit(embed_dim=192, num_heads=3), tmp_path / "m.safetensors"), num_heads=3)
    assert "asserted by the given num_heads" in loaded.arch.provenance["block"]  # sorted keys: only the caller says
    for key in ("embed_dim", "depth", "patch_size", "img_size", "num_heads", "mlp_ratio", "block", "architecture"):
        assert loaded.arch.provenance[key], key


def test_res_post_norm_checkpoint_is_refused(tmp_path: Path) -> None:
    model = _vit(embed_dim=192, num_heads=3, block_fn=ResPostBlock)
    path = tmp_path / "rpn.pth"
    torch.save(model.state_dict(), path)  # a pickle keeps the module order: norm1 after attn
    with pytest.raises(CheckpointError, match="res-post-norm"):
        load_model(path)
    sorted_file = _save(model, tmp_path / "rpn.safetensors")  # sorted keys: the config names the block
    (tmp_path / "rpn.json").write_text(json.dumps({"architecture": "vit_base_patch16_rpn_224"}))
    with pytest.raises(CheckpointError, match="ResPostBlock"):
        load_model(sorted_file)


def test_a_config_naming_a_network_that_is_no_vit_is_refused(tmp_path: Path) -> None:
    """The named model is built on the meta device for its structure (a ViT without weight initialisation; a class
    without timm ViT's ``weight_init`` argument, like ResNet, as it is)."""
    sorted_file = _save(_vit(embed_dim=192, num_heads=3), tmp_path / "vit.safetensors")
    (tmp_path / "vit.json").write_text(json.dumps({"architecture": "resnet18"}))
    with pytest.raises(CheckpointError, match="names resnet18, whose blocks are ResNet"):
        load_model(sorted_file)


def test_pre_norm_pickle_is_recognised_by_its_key_order(tmp_path: Path) -> None:
    path = tmp_path / "pre.pth"
    torch.save(_vit(embed_dim=192, num_heads=3).state_dict(), path)
    assert "norm1 before attn" in load_model(path, num_heads=3).arch.provenance["block"]


def test_parallel_blocks_are_refused() -> None:
    with pytest.raises(CheckpointError, match="parallel blocks"):
        infer_arch(_vit(embed_dim=192, num_heads=3, block_fn=ParallelThingsBlock).state_dict())


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    weights = {k: (v * 100).to(torch.int8) for k, v in _vit(embed_dim=192, num_heads=3).state_dict().items()}
    save_file(weights, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match=r"integer \(quantized\) weights"):
        load_model(tmp_path / "int8.safetensors")


def test_the_architecture_config_json_names_is_built_with_its_preprocessing(tmp_path: Path) -> None:
    """A hub download of vit_small_patch16_224 (mean and std 0.5) was built as deit_small_patch16_224, the same
    network with ImageNet's mean and std, so its quick look, calibration and eval images were normalised wrongly;
    the parity gate cannot see it (both sides get the same images)."""
    from tofu_export.evaluation.data import model_transform

    source = _vit(embed_dim=384, num_heads=6, img_size=224, depth=2, num_classes=1000)
    stated = {"architecture": "vit_small_patch16_224", "model_args": {"depth": 2}, "num_classes": 1000}
    for name, mean in (("vit", (0.5, 0.5, 0.5)), ("deit", (0.485, 0.456, 0.406))):
        folder = tmp_path / name
        folder.mkdir()
        config = {**stated, "architecture": f"{name}_small_patch16_224"}
        (folder / "config.json").write_text(json.dumps(config))
        loaded = load_model(_save(source, folder / "model.safetensors"))
        assert loaded.arch.name == f"{name}_small_patch16_224", loaded.arch
        assert loaded.arch.reason.endswith(f"→ {name}_small_patch16_224 with depth=2"), loaded.arch.reason
        assert loaded.arch.provenance["architecture"] == "config.json names it; sizes from the weights"
        assert tuple(loaded.model.pretrained_cfg["mean"]) == mean
        assert [round(float(v), 3) for v in model_transform(loaded.model).transforms[-1].mean] == list(mean)
    bare = load_model(_save(source, tmp_path / "bare.safetensors"), num_heads=6)  # nothing names it: the table's
    assert bare.arch.name == "deit_small_patch16_224"
    assert bare.arch.provenance["preprocessing"] == "timm's defaults for deit_small_patch16_224"  # said, not hidden


def test_config_json_pretrained_cfg_states_the_preprocessing(tmp_path: Path) -> None:
    from tofu_export.models.timm_vit_evidence import stated_preprocessing

    path = _save(_vit(embed_dim=192, num_heads=3), tmp_path / "model.safetensors")
    pretrained_cfg = {"mean": [0.1, 0.2, 0.3], "std": [0.9, 0.8, 0.7], "crop_pct": 1.0, "interpolation": "bilinear",
                      "hf_hub_id": "someone/some-vit", "input_size": [3, 224, 224]}
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                      "model_args": {"depth": 1, "img_size": 32, "num_classes": 0},
                                                      "pretrained_cfg": pretrained_cfg}))
    loaded = load_model(path)
    cfg = loaded.model.pretrained_cfg
    assert (cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]) == (
        (0.1, 0.2, 0.3), (0.9, 0.8, 0.7), 1.0, "bilinear")
    assert loaded.arch.provenance["preprocessing"] == "config.json pretrained_cfg (mean, std, interpolation, crop_pct)"
    # malformed values are not taken: a non-positive std, a crop over 1, non-numbers
    assert stated_preprocessing({"mean": ["a"], "std": [0.5, 0, 0.5], "crop_pct": 1.5, "crop_mode": 3}) == {}
    assert stated_preprocessing(["not", "a", "dict"]) == {}


def test_a_timm_hub_folder_is_its_weights_file(tmp_path: Path) -> None:
    """A folder as timm's hub gives it (config.json naming an architecture, model.safetensors) loads as the file in
    it with that config, by the timm family (not as a transformers folder); finetune writes it back as a file; a
    folder of timm's config without weights says what it lacks."""
    from tofu_export.models.loading import checkpoint_digest
    from tofu_export.models.tuned import written_as_folder

    folder = tmp_path / "vit_tiny_patch16_224.hub"
    folder.mkdir()
    _save(_vit(embed_dim=192, num_heads=3), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 0,
                                                    "model_args": {"depth": 1, "img_size": 32, "num_classes": 0},
                                                    "pretrained_cfg": {"mean": [0.1, 0.2, 0.3]}}))
    loaded, as_file = load_model(folder), load_model(folder / "model.safetensors")
    assert loaded.family.name == "timm" and loaded.arch.name == as_file.arch.name == "vit_tiny_patch16_224"
    assert loaded.path == folder / "model.safetensors" and loaded.sha256 == checkpoint_digest(folder)
    assert loaded.model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(images), as_file.model(images))
    assert not written_as_folder(folder, None) and written_as_folder(tmp_path, None)
    (folder / "open_clip_config.json").write_text("{}")  # timm's CLIP uploads hold open_clip's files too: read first
    assert written_as_folder(folder, None)
    (folder / "open_clip_config.json").unlink()
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"holds timm's config\.json but none of model\.safetensors"):
        load_model(folder)
