"""The model-family interface: the registry finds the family of a model and of a checkpoint, ``patched`` /
``unpatched`` give the caller's model back exactly as it was, calibration goes through the family and leaves the
caller's patch alone, and no module outside ``models/`` imports a family file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from tofu_export.calibration.damage import single_block_damage
from tofu_export.calibration.trace import trace
from tofu_export.models.family import (
    UnsupportedModelError,
    families,
    family_for_checkpoint,
    family_of,
    is_patched,
    patch,
    patched,
    tofu_state,
    unpatched,
)

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

PACKAGE = Path(__file__).resolve().parents[1] / "tofu_export"


def _settings(model: torch.nn.Module) -> tuple | None:
    state = tofu_state(model)
    return None if state is None else (state.r, state.modes, state.prop_attn, state.img_size, state.plan)


def test_registry_names_the_family_of_models_and_checkpoints(make_vit, tmp_path: Path) -> None:
    assert [f.name for f in families()][-1] == "timm"
    assert family_of(make_vit("deit_tiny_patch16_224", depth=1, img_size=32)).name == "timm"
    with pytest.raises(UnsupportedModelError, match=r"transformers ViTModel.*timm VisionTransformer"):
        family_of(torchvision.models.resnet18(weights=None))
    assert not is_patched(torchvision.models.resnet18(weights=None))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert family_for_checkpoint(tmp_path / "hf").name == "transformers"
    assert family_for_checkpoint(tmp_path / "model.safetensors").name == "timm"


def test_patched_restores_a_plain_and_a_patched_model(make_vit, make_images) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=3, img_size=64)
    images = make_images(2, 64)
    with torch.no_grad():
        plain = model(images)
        with patched(model, r=4, mode="tome"):
            assert is_patched(model)
        assert not is_patched(model) and torch.equal(model(images), plain)
        patch(model, r=[2, 3, 4], mode=["prune", "mlerp", "mean"], prop_attn=False, img_size=64)
        before, output = _settings(model), model(images)
        with patched(model, r=8, mode="tofu"):
            assert _settings(model) != before
        assert _settings(model) == before and torch.equal(model(images), output)
        with unpatched(model):
            assert not is_patched(model) and torch.equal(model(images), plain)
        assert _settings(model) == before


def test_calibration_stages_leave_the_callers_patch_alone(make_vit, make_images) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=32)
    patch(model, r=2, mode="prune", img_size=32)
    before = _settings(model)
    with unpatched(model):
        measured = trace(model, make_images(4, 32), r=2)
        damage = single_block_damage(model, measured, 2, modes=("mean",))
    assert _settings(model) == before and len(damage["mean"]) == 2


def test_with_blocks_leaves_the_model_untouched(make_vit, make_images) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=32)
    family = family_of(model)
    skeleton = family.with_blocks(model, [])
    patch(skeleton, r=[], mode=[], img_size=32)
    assert not is_patched(model) and family.depth(model) == 2 and family.depth(skeleton) == 0


def test_no_module_outside_models_imports_a_family_file() -> None:
    # Denoisers go through their own interface, models/denoiser_family.py (tests/test_denoiser_family.py checks
    # that dense/ and the denoiser commands use only it); the terrain recipe converts into openai_unet_build directly.
    # Every ViT family must go through family.py / loading.py.
    denoisers = {p.stem for p in (PACKAGE / "models").glob("openai_unet*.py")}
    denoisers |= {p.stem for p in (PACKAGE / "models").glob("diffusers_*.py")}  # the diffusers denoiser files
    interfaces = {"__init__", "family", "loading", "denoiser_family",
                  "tuned"}  # what finetune writes with the weights and every family reads back (torch-free)
    family_files = {p.stem for p in (PACKAGE / "models").glob("*.py")} - interfaces - denoisers
    pattern = re.compile(r"(?:from|import)\s+tofu_export\.models\.(\w+)")
    offenders = [
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py") if "models" not in path.relative_to(PACKAGE).parts[:1]
        for name in pattern.findall(path.read_text(encoding="utf-8")) if name in family_files
    ]
    assert offenders == []


def test_a_configured_patch_makes_its_token_plan_once(make_vit, monkeypatch) -> None:
    """``ToFuConfig.resolve`` plans the tokens (an impossible r is refused before an export writes anything) and the
    family's patch takes that plan (the export path's ``resolved.patch``): ``schedule.plan_tokens`` runs once, a
    clipped block is still said by the patch, at the caller's line (not inside tofu_export); a plan made for other r
    is refused."""
    from tofu_export import config, schedule

    calls = []
    real = schedule.plan_tokens

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(schedule, "plan_tokens", spy)
    monkeypatch.setattr(config, "plan_tokens", spy)
    model = make_vit("deit_tiny_patch16_224", depth=4, img_size=32)  # 5 tokens, 1 protected
    with pytest.warns(UserWarning, match=r"r=2 is more than block 1 can remove") as caught:
        resolved = config.ToFuConfig(r=2, img_size=32).patch(model)
    assert len(calls) == 1 and tofu_state(model).plan is resolved.plan
    assert (resolved.plan.tokens, resolved.plan.r) == ([5, 3, 2, 2], [2, 1, 0, 0])
    assert len(caught) == 1 and caught[0].filename == __file__
    other = real(5, 1, [1, 1, 1, 1], warn=False)
    with pytest.raises(ValueError, match=r"r=\[1, 1, 1, 1\] was handed to a model receiving 5 tokens with r=\[2, 2"):
        family_of(model).patch(model, 2, "tofu", True, 32, plan=other)
