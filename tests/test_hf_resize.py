"""transformers models at an input size of the user's: ``load_model(folder, img_size=N)`` rebuilds the model for N
with its position embeddings resampled once by its own ``interpolate_pos_encoding``, so that it computes what the
original computes at N with interpolation (``interpolate_pos_encoding=True``: ViT, CLIP, SigLIP; DINOv2 always
interpolates and takes no such argument; DINOv3's rotations follow the grid), and its static export at N matches
that eager model. Sizes that are not a multiple of the patch are refused before any weight is read."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tofu_export import load_model  # noqa: E402
from tofu_export.checkpoint import CheckpointError  # noqa: E402
from tofu_export.exporters.onnx import export_onnx  # noqa: E402
from tofu_export.models import hf_vit_load  # noqa: E402
from tofu_export.models.family import patch, patched  # noqa: E402
from tofu_export.models.hf_vit_resize import resized  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

IMG, NEW, PATCH = 32, 48, 4
INTERPOLATING = {"ViTModel", "ViTForImageClassification", "CLIPVisionModel", "CLIPVisionModelWithProjection",
                 "SiglipVisionModel"}  # the classes whose forward takes interpolate_pos_encoding


def _config(cls: type, **extra: object) -> object:
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMG,
               patch_size=PATCH, attn_implementation="eager", **extra)


BUILDERS = {
    "ViTModel": lambda: transformers.ViTModel(_config(transformers.ViTConfig)),
    "ViTForImageClassification": lambda: transformers.ViTForImageClassification(
        _config(transformers.ViTConfig, num_labels=5)),
    "Dinov2Model": lambda: transformers.Dinov2Model(_config(transformers.Dinov2Config)),
    "Dinov2WithRegistersModel": lambda: transformers.Dinov2WithRegistersModel(
        _config(transformers.Dinov2WithRegistersConfig, num_register_tokens=2)),
    "CLIPVisionModel": lambda: transformers.CLIPVisionModel(_config(transformers.CLIPVisionConfig)),
    "CLIPVisionModelWithProjection": lambda: transformers.CLIPVisionModelWithProjection(
        _config(transformers.CLIPVisionConfig, projection_dim=16)),
    "SiglipVisionModel": lambda: transformers.SiglipVisionModel(_config(transformers.SiglipVisionConfig)),
    "DINOv3ViTModel": lambda: transformers.DINOv3ViTModel(  # rotary: no position table, any size by its grid
        _config(transformers.DINOv3ViTConfig, num_register_tokens=2)),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def images(size: int = NEW) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def interpolating(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager transformers model at ``x``'s size, resampling its positions per call; the output the export
    wrapper returns (logits, image embeddings, else the pooled feature)."""
    takes = "interpolate_pos_encoding" in inspect.signature(type(hf).forward).parameters
    with torch.no_grad():
        out = hf(pixel_values=x, **({"interpolate_pos_encoding": True} if takes else {}))
    return next(out[key] for key in ("logits", "image_embeds", "pooler_output") if out.get(key) is not None)


def test_which_classes_take_interpolate_pos_encoding() -> None:
    taking = {name for name in BUILDERS
              if "interpolate_pos_encoding" in inspect.signature(getattr(transformers, name).forward).parameters}
    assert taking == INTERPOLATING


@pytest.mark.parametrize("name", BUILDERS)
def test_resized_model_computes_the_interpolating_forward(name: str) -> None:
    original = build(name)
    model = resized(original, NEW)
    assert model.config.image_size == NEW and original.config.image_size == IMG
    torch.testing.assert_close(interpolating(model, images()), interpolating(original, images()), rtol=0, atol=1e-6)
    assert resized(original, IMG) is original


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_resize")
    for name in ("ViTModel", "Dinov2Model"):
        build(name).save_pretrained(root / name)
    return {name: root / name for name in ("ViTModel", "Dinov2Model")}


def test_a_size_off_the_patch_grid_is_refused_before_reading_weights(folders: dict[str, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_vit_load, "_weights_files", None)  # reading the weights would fail the test
    with pytest.raises(CheckpointError, match=r"50 px.*multiple of its patch \(4 px\)") as caught:
        load_model(folders["ViTModel"], img_size=50)
    assert caught.value.hint.option == "img_size" and caught.value.hint.value == str(IMG)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViTModel", "Dinov2Model"])
def test_export_at_a_new_size_matches_the_interpolating_model(name: str, folders: dict[str, Path],
                                                              tmp_path: Path) -> None:
    loaded = load_model(folders[name], img_size=NEW)
    assert loaded.img_size == NEW and loaded.arch.provenance["image_size"] == "--img-size" and loaded.arch.notes
    assert loaded.family.num_tokens(loaded.model) == (NEW // PATCH) ** 2 + 1
    with torch.no_grad(), patched(loaded.model, r=8, mode="tofu", img_size=NEW):
        loaded.model(images())  # the reduction plans for the new token count
    patch(loaded.model, r=0, img_size=NEW)
    result = export_onnx(loaded.model, tmp_path / "model.onnx", NEW)  # the default (dynamo) exporter
    assert result.parity is not None and result.parity.ok
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images().numpy()})[0]
    np.testing.assert_allclose(got, interpolating(build(name), images()).numpy(), rtol=0, atol=1e-4)
