"""The Hugging Face family on tiny random configs of every supported class (no downloads): the patch is the identity
at r=0 and is taken off cleanly, the calibration hooks compute what the forward computes, eager and SDPA attention
agree, proportional attention and SigLIP's size-weighted pool are really applied, every class exports statically
with parity and passes the TensorRT check, and ``save_pretrained`` folders load through ``load_model``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from two_towers import tiny_two_towers

transformers = pytest.importorskip("transformers")

from tofu_export import load_model  # noqa: E402
from tofu_export.accounting import token_schedule  # noqa: E402
from tofu_export.checkpoint import CheckpointError  # noqa: E402
from tofu_export.exporters.onnx import export_onnx  # noqa: E402
from tofu_export.merge import reduce_tokens  # noqa: E402
from tofu_export.models.family import family_of, is_patched, patch, patched, unpatch  # noqa: E402
from tofu_export.models.hf_vit import HFVisionEncoder, wrap  # noqa: E402
from tofu_export.models.hf_vit_specs import layers_of  # noqa: E402
from tofu_export.models.loading import checkpoint_digest  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

FORBIDDEN_OPS = {"ScatterElements", "ScatterND", "Scatter", "If", "Loop", "NonZero"}
IMG = 32


def _config(cls: type, attn: str, **extra: object) -> object:
    base = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=IMG,
                patch_size=4, attn_implementation=attn)
    return cls(**base, **extra)


BUILDERS: dict[str, Callable[[str], torch.nn.Module]] = {
    "ViTModel": lambda a: transformers.ViTModel(_config(transformers.ViTConfig, a)),
    "ViTForImageClassification": lambda a: transformers.ViTForImageClassification(
        _config(transformers.ViTConfig, a, num_labels=5)),
    "Dinov2Model": lambda a: transformers.Dinov2Model(_config(transformers.Dinov2Config, a)),
    "Dinov2WithRegistersModel": lambda a: transformers.Dinov2WithRegistersModel(
        _config(transformers.Dinov2WithRegistersConfig, a, num_register_tokens=2)),
    "CLIPVisionModel": lambda a: transformers.CLIPVisionModel(_config(transformers.CLIPVisionConfig, a)),
    "CLIPVisionModelWithProjection": lambda a: transformers.CLIPVisionModelWithProjection(
        _config(transformers.CLIPVisionConfig, a, projection_dim=16)),
    "SiglipVisionModel": lambda a: transformers.SiglipVisionModel(_config(transformers.SiglipVisionConfig, a)),
    "DINOv3ViTModel": lambda a: transformers.DINOv3ViTModel(
        _config(transformers.DINOv3ViTConfig, a, num_register_tokens=2, layerscale_value=1.0)),
    "DeiTModel": lambda a: transformers.DeiTModel(_config(transformers.DeiTConfig, a)),
    "DeiTForImageClassificationWithTeacher": lambda a: transformers.DeiTForImageClassificationWithTeacher(
        _config(transformers.DeiTConfig, a, num_labels=5)),
}
PREFIX = {"Dinov2WithRegistersModel": 3, "SiglipVisionModel": 0, "DINOv3ViTModel": 3, "DeiTModel": 2,
          "DeiTForImageClassificationWithTeacher": 2}


def build(name: str, attn: str = "eager") -> HFVisionEncoder:
    torch.manual_seed(0)
    return wrap(BUILDERS[name](attn))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", BUILDERS)
def test_geometry_r0_identity_and_clean_unpatch(name: str, images: torch.Tensor) -> None:
    model = build(name)
    family = family_of(model)
    assert family.name == "transformers" and family_of(model.hf) is family
    assert family.num_prefix(model) == PREFIX.get(name, 1)
    assert family.num_tokens(model) == (IMG // 4) ** 2 + PREFIX.get(name, 1)
    assert family.depth(model) == 3 and family.img_size(model) == (IMG, IMG)
    with torch.no_grad():
        reference = model(images)
        with patched(model, r=0):
            assert torch.equal(model(images), reference)
        patch(model, r=8, mode="tome")
        assert is_patched(model) and token_schedule(model).tokens[1] == family.num_tokens(model) - 8
        assert not torch.allclose(model(images), reference, atol=1e-6)  # tokens really are reduced
        unpatch(model)
        assert not is_patched(model) and torch.equal(model(images), reference)
    assert all(not type(layer).__name__.startswith("ToFu") for layer in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", BUILDERS)
def test_calibration_hooks_compute_the_forward(name: str, images: torch.Tensor) -> None:
    """embed -> run_blocks -> pooled_output (and the classifier / projection) is the wrapper's forward, patched or
    not; attention_half + mlp_half is one layer."""
    model = build(name)
    family = family_of(model)
    tail = getattr(model.hf, "classifier", None) or getattr(model.hf, "visual_projection", None) or torch.nn.Identity()
    if name == "DeiTForImageClassificationWithTeacher":  # the pooled feature is both tokens, each read by its head
        width, hf = model.hf.config.hidden_size, model.hf
        tail = lambda p: (hf.cls_classifier(p[:, :width]) + hf.distillation_classifier(p[:, width:])) / 2  # noqa: E731
    with torch.no_grad():
        x = family.embed(model, images)
        y, metric = family.attention_half(model, 0, x)
        assert metric.shape == (3, x.shape[1], 16)
        rotary = {"position_embeddings": model.hf.rope_embeddings(images)} if name.startswith("DINOv3") else {}
        torch.testing.assert_close(family.mlp_half(model, 0, y), layers_of(model)[0](x, None, **rotary), rtol=0,
                                   atol=1e-6)
        with patched(model, r=6, mode="mlerp"):
            hooks = tail(family.pooled_output(model, family.run_blocks(model, x, 0)))
            torch.testing.assert_close(hooks, model(images), rtol=0, atol=1e-6)
        plain = tail(family.pooled_output(model, family.run_blocks(model, x, 0)))
        torch.testing.assert_close(plain, model(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BUILDERS)
def test_eager_and_sdpa_agree_with_proportional_attention(name: str, images: torch.Tensor) -> None:
    eager, sdpa = build(name, "eager"), build(name, "sdpa")
    with torch.no_grad(), patched(eager, r=8, mode="tofu"), patched(sdpa, r=8, mode="tofu"):
        torch.testing.assert_close(eager(images), sdpa(images), rtol=0, atol=1e-5)
        with_prop = eager(images)
        with patched(eager, r=8, mode="tofu", prop_attn=False):
            assert not torch.allclose(eager(images), with_prop, atol=1e-6)  # the log(size) mask is applied


def test_dinov3_kept_tokens_keep_their_rotations(images: torch.Tensor) -> None:
    """Layer 0 prunes; layer 1 of the patched model computes what transformers' own layer 1 computes on the tokens
    layer 0 kept, each with the ``(cos, sin)`` of its grid position."""
    model = build("DINOv3ViTModel")
    layers, prefix = layers_of(model), 3
    with torch.no_grad():
        for layer in layers:  # sharper attention than random init gives, so that where a token is matters
            layer.attention.q_proj.weight.mul_(20)
            layer.attention.k_proj.weight.mul_(20)
        family = family_of(model)
        x = family.embed(model, images)  # [B, N, C]
        cos, sin = model.hf.rope_embeddings(images)  # [N - p, D] each
        y0 = layers[0](x, None, position_embeddings=(cos, sin))  # transformers' own
        with patched(model, r=[5, 0, 0], mode="prune", img_size=IMG):
            reduced = layers[0](x, None, position_embeddings=(cos, sin))  # [B, N - 5, C]
            order = torch.arange(x.shape[1]).float().view(1, -1, 1).expand(len(images), -1, 1)
            kept, _ = reduce_tokens(order, None, layers[0].reduce.matching, "prune", prefix)
            kept = kept.long().squeeze(-1)  # [B, N - 5]: each kept token's index
            out = layers[1](reduced, None, position_embeddings=(cos, sin))  # given all: it must use the kept ones
        rows = kept[:, prefix:] - prefix
        per_sample = tuple(torch.stack([table[r] for r in rows]).unsqueeze(1) for table in (cos, sin))
        expected = layers[1](reduced, None, position_embeddings=per_sample)
        unrotated = layers[1](reduced, None, position_embeddings=(cos[: rows.shape[1]], sin[: rows.shape[1]]))
    torch.testing.assert_close(reduced, torch.stack([y0[b, kept[b]] for b in range(len(images))]), rtol=0, atol=0)
    assert kept[:, :prefix].eq(torch.arange(prefix)).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert (out - unrotated).abs().max() > 1e-3


def test_dinov3_one_block_latency_graph_gets_its_rotations(tmp_path: Path) -> None:
    """``calibrate``'s one-block graph of a rotary layer is handed ``(cos, sin)`` for the patch tokens it receives
    (transformers' DINOv3 attention takes no call without them)."""
    import onnx

    from tofu_export.calibration.latency import block_graph
    from tofu_export.calibration.measured import ExportSettings

    path = block_graph(build("DINOv3ViTModel"), "mlerp", 40, 4, settings=ExportSettings("dynamo", 17), folder=tmp_path)
    dims = [d.dim_value or d.dim_param for d in onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [36, 32]


def test_siglip_attention_pool_weighs_tokens_by_size(images: torch.Tensor) -> None:
    model = build("SiglipVisionModel")
    with torch.no_grad(), patched(model, r=8, mode="tome", prop_attn=False):
        weighted = model(images)
        (pool_hook,) = model.hf.head.attention._forward_pre_hooks.values()
        model.hf.head.attention._forward_pre_hooks.clear()
        unweighted = model(images)
        model.hf.head.attention.register_forward_pre_hook(pool_hook, with_kwargs=True)
        torch.testing.assert_close(model(images), weighted, rtol=0, atol=0)
    assert not torch.allclose(weighted, unweighted, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILDERS)
def test_every_class_exports_statically_with_parity(name: str, tmp_path: Path) -> None:
    from tofu_export.exporters.graph_costs import reduction_costs
    from tofu_export.tensorrt.check import check_tensorrt_compat

    model = build(name)
    patch(model, r=8, mode="tofu", img_size=IMG, prune_layers=1)  # prune then MLERP: two reduce modes
    result = export_onnx(model, tmp_path / "model.onnx", IMG, exporter="torchscript")
    assert result.parity is not None and result.parity.ok
    # a classifier's parity also compares top-1 classes (what the FP16 / INT8 floors hold it to)
    assert (result.parity.top1_agreement is not None) == ("ForImageClassification" in name)
    assert not set(result.op_counts) & FORBIDDEN_OPS and "TopK" in result.op_counts
    report = check_tensorrt_compat(tmp_path / "model.onnx", ("10",))
    assert report.ok, report.render()
    costs = reduction_costs(tmp_path / "model.onnx")  # `check --costs` finds each layer's reduce scope
    assert [block.block for block in costs.blocks] == [0, 1, 2] and all(b.ops["TopK"] >= 2 for b in costs.blocks)


@pytest.fixture(scope="module")
def saved_dinov2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, HFVisionEncoder]:
    model = build("Dinov2WithRegistersModel")
    folder = tmp_path_factory.mktemp("hf") / "dinov2"
    model.hf.save_pretrained(folder)
    return folder, model


def test_save_pretrained_folder_loads_with_provenance(saved_dinov2: tuple[Path, HFVisionEncoder],
                                                      images: torch.Tensor) -> None:
    folder, original = saved_dinov2
    loaded = load_model(folder)
    assert isinstance(loaded.model, HFVisionEncoder) and loaded.arch.name == "Dinov2WithRegistersModel"
    assert loaded.arch.kwargs["num_attention_heads"] == 2
    assert loaded.arch.provenance["num_attention_heads"] == "config.json" and len(loaded.sha256) == 64
    assert checkpoint_digest(folder) == loaded.sha256  # what eval checks an artifact's checkpoint by
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), original(images), rtol=0, atol=1e-5)  # SDPA vs eager


def test_an_artifact_exported_from_a_folder_at_another_size_is_evaluated_against_that_folder(
        saved_dinov2: tuple[Path, HFVisionEncoder], tmp_path: Path) -> None:
    """The manifest records the folder (its content hash, not a file's) and the size the graph takes: eval finds the
    folder and reloads it at that size (a folder was refused as "not there"; the size was the folder's own)."""
    import numpy as np
    from PIL import Image

    from tofu_export.config import ExportConfig, OnnxConfig, ToFuConfig
    from tofu_export.jobs.evaluate import evaluate_model
    from tofu_export.pipeline import run_export

    folder, _ = saved_dinov2
    rng = np.random.default_rng(0)
    for k in range(4):  # an ImageFolder: two classes
        (tmp_path / "data" / str(k % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(tmp_path / "data" / str(k % 2) /
                                                                               f"{k}.png")
    out = tmp_path / "artifact"
    run_export(folder, out, ExportConfig(tofu=ToFuConfig(r=2, img_size=48), onnx=OnnxConfig(exporter="torchscript")))
    report = evaluate_model(out / "model.onnx", tmp_path / "data", tofu=ToFuConfig(r=2), compare_tome=False)
    assert report["task"] == "fidelity" and report["n_eval"] == 4 and report["r"] == [2, 2, 2]
    assert 0.9 < report["metrics"]["cosine_mean"] <= 1.0 + 1e-6


def test_the_sweeps_estimate_times_a_forward_at_the_folders_own_size(saved_dinov2: tuple[Path, HFVisionEncoder]
                                                                      ) -> None:
    """The sweep's unit of work (one batch-1 forward) at the size the family states: it read timm's
    ``patch_embed`` and ended a sweep of any transformers folder with an internal error."""
    from tofu_export.sweep.job import _forward_ms

    folder, _ = saved_dinov2
    assert _forward_ms(load_model(folder)) > 0


def test_a_transformers_classifier_is_evaluated_as_one(tmp_path: Path) -> None:
    """Its logits get top-1 / top-5, a headless encoder's output cosine: the family says which (eval read timm's
    ``num_classes`` and scored every transformers classifier's logits as features)."""
    import numpy as np
    from PIL import Image

    from tofu_export.evaluation import evaluate

    classifier, encoder = build("ViTForImageClassification"), build("ViTModel")
    assert family_of(classifier).num_classes(classifier) == 5 and family_of(encoder).num_classes(encoder) == 0
    rng = np.random.default_rng(0)
    for k in range(4):
        (tmp_path / str(k % 2)).mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)).save(tmp_path / str(k % 2) / f"{k}.png")
    report = evaluate(classifier, patch(build("ViTForImageClassification"), r=2, mode="tofu"), tmp_path)
    assert report.task == "classification" and "candidate_top1" in report.metrics
    assert evaluate(encoder, build("ViTModel"), tmp_path).task == "fidelity"


def test_pickled_folder_needs_trust(saved_dinov2: tuple[Path, HFVisionEncoder], tmp_path: Path) -> None:
    folder, original = saved_dinov2
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(original.hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled") as caught:
        load_model(tmp_path)
    assert caught.value.hint is not None and caught.value.hint.option == "trust_pickle"


def test_folder_of_an_unsupported_class_is_refused(saved_dinov2: tuple[Path, HFVisionEncoder]) -> None:
    folder, _ = saved_dinov2
    with pytest.raises(CheckpointError, match=r"SwinModel.*Dinov2Model"):
        load_model(folder, arch="SwinModel")


def test_folder_without_transformers_names_the_extra(saved_dinov2: tuple[Path, HFVisionEncoder],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = saved_dinov2
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(CheckpointError, match="transformers is not installed") as caught:
        load_model(folder)
    assert "tofu-export[hf]" in caught.value.hint.text


@pytest.mark.parametrize(("processor", "expected"), [
    ("vit", {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5)}),
    ("dinov2", {"crop_mode": "center", "crop_pct": IMG / 36, "interpolation": "bicubic",
                "mean": (0.485, 0.456, 0.406)})])
def test_the_image_processor_config_is_the_eval_transform(saved_dinov2: tuple[Path, HFVisionEncoder], processor: str,
                                                          expected: dict, tmp_path: Path) -> None:
    """preprocessor_config.json's resize, crop and resampling, not only its mean and std, make the transform the
    quick look, calibration and eval use and the manifest records: ViT's processor squashes to its size, DINOv2's
    resizes the shorter side and crops. Checked against the processor itself on one image."""
    from PIL import Image

    from tofu_export.evaluation.data import model_transform

    folder, _ = saved_dinov2
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    if processor == "vit":
        hf_processor = transformers.ViTImageProcessor(size={"height": IMG, "width": IMG})  # bilinear, mean 0.5
    else:
        hf_processor = transformers.BitImageProcessor(  # DINOv2's: shorter side to 256, crop 224, bicubic (scaled)
            size={"shortest_edge": 36}, crop_size={"height": IMG, "width": IMG}, do_center_crop=True, resample=3,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    hf_processor.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    config = family_of(loaded.model).data_config(loaded.model)
    assert {key: config[key] for key in expected} == pytest.approx(expected)
    pixels = np.random.default_rng(0).integers(0, 255, (52, 40, 3), dtype=np.uint8)  # portrait; even crop margins
    image = Image.fromarray(pixels)
    ours = model_transform(loaded.model)(image)
    theirs = torch.from_numpy(hf_processor(images=image, return_tensors="np")["pixel_values"][0])
    assert ours.shape == theirs.shape == (3, IMG, IMG)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-2)  # one 8-bit level / std: resize rounding (seen 0.018)


def _two_towers(name: str, folder: Path) -> torch.nn.Module:
    """A tiny random ``CLIPModel`` / ``SiglipModel`` saved to ``folder`` with a preprocessor config; the model."""
    model = tiny_two_towers(name, folder)
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}')
    return model


def image_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A two-tower model's image embedding (a tensor in older transformers, an output object in newer)."""
    out = model.get_image_features(pixel_values=images)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize(("name", "vision"), [("CLIPModel", "CLIPVisionModelWithProjection"),
                                              ("SiglipModel", "SiglipVisionModel")])
def test_a_two_tower_folder_is_read_as_its_vision_tower(name: str, vision: str, tmp_path: Path,
                                                         images: torch.Tensor) -> None:
    """What openai/clip-vit-* and google/siglip-* hold: the vision class, built from the full config's vision_config,
    with the full checkpoint's vision keys; its image embedding is the full model's."""
    full = _two_towers(name, tmp_path / "full")
    loaded = load_model(tmp_path / "full")
    assert loaded.family.name == "transformers" and loaded.arch.name == vision
    assert "the vision tower of the " + name in loaded.arch.reason and loaded.arch.kwargs["hidden_size"] == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(images), image_features(full, images), rtol=0, atol=0)
    assert loaded.model.preprocess["mean"] == [0.5, 0.5, 0.5]
