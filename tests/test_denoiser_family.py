"""The denoiser-family interface (``models/denoiser_family.py``): which family recognises which checkpoint, the main
command's routing, patch / unpatch / step / sampler through the interface on tiny random models (no downloads, no
export; the OpenAI UNet and test_diffusers.py's UNet2DConditionModel, DiT and PixArt), and that ``dense/`` and the
denoiser commands reach models only through it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tofu_export
from tofu_export.dense.plan import plan_blocks
from tofu_export.errors import UserError
from tofu_export.models.denoiser_family import (
    denoiser_families,
    denoiser_family_for,
    denoiser_family_of,
    load_denoiser_source,
)
from tofu_export.models.openai_unet_build import build_model
from tofu_export.models.openai_unet_config import UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread

PACKAGE = Path(tofu_export.__file__).parent
CFG = UNetConfig(image_size=16, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1,
                 attention_resolutions=(8,), channel_mult=(1, 2), num_head_channels=32, label="continuous",
                 denoiser="consistency")



def openai_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(CFG)
    for p in model.parameters():  # the original zero-initialises output convs; give every layer a say
        p.data.normal_(0, 0.05)
    return model


def diffusers_dit() -> torch.nn.Module:  # the tiny DiT of test_diffusers.py
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                           num_embeds_ada_norm=10).eval()


def diffusers_unet() -> torch.nn.Module:  # the tiny UNet2DConditionModel of test_diffusers.py
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def diffusers_pixart() -> torch.nn.Module:  # the tiny PixArt of test_diffusers.py
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                              cross_attention_dim=32, caption_channels=32).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("denoisers")
    (root / "openai").mkdir()
    (root / "openai" / "config.json").write_text(CFG.to_json())
    save_file({k: v.contiguous() for k, v in openai_unet().state_dict().items()},
              str(root / "openai" / "model.safetensors"))
    (root / "vit").mkdir()  # a transformers folder: config.json without _class_name or "kind"
    (root / "vit" / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}))
    (root / "vit" / "model.safetensors").write_bytes(b"")
    (root / "lone.pth").write_bytes(b"")
    return root


def test_each_family_recognises_its_checkpoints_and_nothing_else(sources) -> None:
    names = [f.name for f in denoiser_families()]
    assert names == ["diffusers", "openai-unet"]
    assert denoiser_family_for(sources / "openai").name == "openai-unet"
    assert denoiser_family_for(sources / "openai" / "model.safetensors").name == "openai-unet"  # its config beside
    for other in ("vit", "vit/model.safetensors", "lone.pth", "missing"):
        assert denoiser_family_for(sources / other) is None, other
    pipe = sources / "pipe"
    (pipe / "unet").mkdir(parents=True, exist_ok=True)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipe / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    assert denoiser_family_for(pipe).name == "diffusers"  # cheap: no diffusers import, no weights read
    assert denoiser_family_for(pipe / "unet").describe(pipe / "unet") == "a diffusers UNet2DConditionModel folder"


def test_the_main_command_sends_every_denoiser_to_the_denoiser_command(sources) -> None:
    from tofu_export.models.loading import load_model

    for path in (sources / "openai", sources / "openai" / "model.safetensors"):
        with pytest.raises(UserError, match="OpenAI / consistency-models UNet checkpoint: a diffusion denoiser") as e:
            load_model(path)
        assert f"tofu-export denoiser {path} -o OUT" in str(e.value)


def test_loading_goes_through_the_family_and_refuses_a_wrong_size(sources) -> None:
    loaded = load_denoiser_source(sources / "openai")
    assert loaded.family.name == "openai-unet" and loaded.size == 16 and loaded.kind == "ConsistencyDenoiser"
    with pytest.raises(UserError, match="built for 16x16 samples, not 32"):
        load_denoiser_source(sources / "openai", size=32)
    with pytest.raises(UserError, match="no UNet config"):  # no family recognises it: the fallback says what is missing
        load_denoiser_source(sources / "lone.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_denoiser_source(sources / "missing")


@pytest.mark.parametrize("build", [openai_unet, diffusers_dit, diffusers_unet, diffusers_pixart])
def test_patch_step_and_sampler_through_the_interface(build) -> None:
    model = build()
    family = denoiser_family_of(model)
    size = 16
    make = family.make_inputs(model, size)
    inputs = make(2, 0)
    assert len(inputs) == len(family.input_names(model)) and inputs[0].shape[-1] == size
    grids = family.grids(model, inputs)
    assert grids and all(h * w in (16 * 16, 8 * 8) for h, w in grids.values())
    step = family.step(model)
    sample = family.sampler(model, size, samples=1, seed=3)
    with torch.no_grad():
        base = step(*inputs)
    reference = sample()
    assert reference.shape == inputs[0][:1].shape
    family.patch(model, plan_blocks(grids, 0.5, "prune"), grids)
    with torch.no_grad():
        reduced = step(*inputs)
    assert reduced.shape == base.shape and not torch.allclose(reduced, base)
    assert not torch.allclose(sample(), reference)  # the sampler runs the model as patched now
    family.unpatch(model)
    with torch.no_grad():
        assert torch.equal(step(*inputs), base)
    assert torch.equal(sample(), reference)  # fixed noise and conditioning: deterministic, and the patch is gone


def test_the_openai_unet_reduces_self_attention_only() -> None:
    model = openai_unet()
    family = denoiser_family_of(model)
    grids = family.grids(model, ())
    with pytest.raises(UserError, match="self-attention only"):
        family.patch(model, plan_blocks(grids, 0.5, "mean", sublayers="self,mlp"), grids)
    with pytest.raises(UserError, match="cannot reduce a Linear"):
        denoiser_family_of(torch.nn.Linear(2, 2))


def test_dense_and_the_denoiser_commands_reach_models_only_through_the_interface() -> None:
    """``dense/`` (and the command file) import no model file but ``denoiser_family``, and branch on no class."""
    files = [*(PACKAGE / "dense").glob("*.py"), PACKAGE / "cli" / "denoiser.py"]
    imports = re.compile(r"tofu_export\.models\.(\w+)")
    knowledge = re.compile(r"diffusers_class\(|cfg\.denoiser|UNet2D|DiTTransformer|PixArt|ConsistencyDenoiser")
    offenders = [f"{path.name}: {name}" for path in files for name in imports.findall(path.read_text())
                 if name != "denoiser_family"]
    offenders += [f"{path.name}: {hit}" for path in files[:-1] for hit in knowledge.findall(_code(path))]
    assert offenders == []


def _code(path: Path) -> str:
    """``path``'s code without docstrings and comments (a docstring may name the model that motivated a rule)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value,
                                                                                          ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)
