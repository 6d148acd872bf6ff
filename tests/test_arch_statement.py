"""#24: no silently wrong model. A checkpoint whose head count or block kind nothing states (not the weights, not a
config beside it, not the file's own training record, not the caller) is refused with the two ways in; stated, the
export reproduces the original model; res-post-norm blocks are refused; every command that reads a checkpoint takes
``--arch`` / ``--num-heads`` (#18)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from tofu_export.checkpoint import CheckpointError
from tofu_export.cli import app
from tofu_export.models.loading import load_model

pytestmark = pytest.mark.filterwarnings("ignore")
IMG, HEADS = 64, 6  # a 192-wide ViT with 6 heads: timm's 192-wide models have 3


def _six_head_vit() -> VisionTransformer:
    """Sharp attention (qkv scaled), so a wrong head count changes the output (cosine 0.25 with 3 heads here)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMG, patch_size=16, depth=2, embed_dim=192, num_heads=HEADS, num_classes=0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300", "NO_COLOR": "1"})
    return result.exit_code, result.output


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bare 6-head checkpoint alone in its folder, and a folder of 2 x 2 images."""
    root = tmp_path_factory.mktemp("statement")
    paths = {"bare": _save(_six_head_vit(), root / "bare" / "model.safetensors"), "data": root / "data"}
    rng = np.random.default_rng(0)
    for label in range(2):
        (paths["data"] / str(label)).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(paths["data"] / str(label) / f"{k}.png")
    return paths


@pytest.fixture(scope="module")
def exported(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """``export --num-heads 6`` of the bare checkpoint (r=0: the graph must be the original model)."""
    out = tmp_path_factory.mktemp("export") / "artifact"
    code, output = _invoke("export", str(files["bare"]), "--num-heads", str(HEADS), "--r", "0", "--no-bench",
                           "--exporter", "torchscript", "-o", str(out))
    return code, output, out


def test_bare_checkpoint_is_refused_with_the_two_ways_in(files: dict[str, Path]) -> None:
    code, output = _invoke("export", str(files["bare"]), "--no-bench", "-o", str(files["bare"].parent / "out"))
    assert code == 2, output
    assert re.search(r"Use --arch (deit|vit)_tiny_patch16_224 if this is timm's \S+ \(3 heads", output), output
    assert "or --num-heads N" in output
    assert "head count" in output and "block kind" in output
    assert "Traceback" not in output and sum(line.startswith("error:") for line in output.splitlines()) == 1
    assert not (files["bare"].parent / "out").exists()


def test_num_heads_exports_the_original_model(files: dict[str, Path], exported: tuple[int, str, Path]) -> None:
    code, output, out = exported
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    provenance = manifest["arch"]["provenance"]
    assert manifest["arch"]["kwargs"]["num_heads"] == HEADS and provenance["num_heads"] == "given"
    assert "asserted by the given num_heads" in provenance["block"]  # sorted keys: only the caller states it
    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    graph = torch.cat([torch.from_numpy(session.run(None, {name: image[None].numpy()})[0]) for image in images])
    original, wrong = _six_head_vit(), VisionTransformer(img_size=IMG, patch_size=16, depth=2, embed_dim=192,
                                                         num_heads=3, num_classes=0).eval()
    wrong.load_state_dict(original.state_dict())  # what the width table built before
    with torch.no_grad():
        assert _cosine(graph, original(images)) > 0.9999
        assert _cosine(graph, wrong(images)) < 0.99  # the check above could fail: the head count matters here


def test_eval_of_the_artifact_rebuilds_its_reference_as_exported(files: dict[str, Path],
                                                                 exported: tuple[int, str, Path]) -> None:
    graph = str(exported[2] / "model.onnx")
    code, output = _invoke("eval", graph, str(files["data"]), "--json", "--no-compare-tome")
    assert code == 0, output  # the manifest says num_heads was given: the reference is built with it
    assert json.loads(output[output.index("{"):])["metrics"]["cosine_min"] > 0.9999
    named = ("eval", graph, str(files["data"]), "--reference", str(files["bare"]), "--no-compare-tome")
    code, output = _invoke(*named)  # a reference named by the caller is read as the caller states it
    assert code == 2 and "--num-heads N" in output, output
    code, output = _invoke(*named, "--num-heads", str(HEADS), "--json")
    assert code == 0 and json.loads(output[output.index("{"):])["metrics"]["cosine_min"] > 0.9999, output


@pytest.mark.parametrize("command", [
    ("schedule", "@bare", "--r", "1"),
    ("profile", "@bare", "--backend", "torch", "--r", "1", "--iters", "1", "--warmup", "0", "--no-breakdown"),
    ("eval", "@bare", "@data", "--r", "1", "--no-compare-tome", "--limit", "2"),
    ("calibrate", "@bare", "@data", "--images", "8", "-o", "@policy"),
    ("sweep", "@bare", "--r", "0", "--modes", "tome", "--iters", "1", "-o", "@sweep"),
], ids=lambda c: c[0])
def test_every_command_that_reads_a_checkpoint_refuses_it_and_takes_num_heads(
        command: tuple[str, ...], files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = {**files, "policy": tmp_path / "policy.json", "sweep": tmp_path / "sweep"}
    args = [str(paths[a[1:]]) if a.startswith("@") else a for a in command]
    code, output = _invoke(*args)
    assert code == 2 and "--num-heads N" in output and "Traceback" not in output, output
    if command[0] in ("calibrate", "sweep"):  # the flag reaches the loader; the rest of the job is not under test
        import tofu_export.calibration as calibration
        from tofu_export.sweep import job

        def stop(*_args: object, **_kwargs: object) -> None:
            raise SystemExit(17)

        monkeypatch.setattr(calibration, "load_images", stop)
        monkeypatch.setattr(job, "_forward_ms", stop)
    code, output = _invoke(*args, "--num-heads", str(HEADS))
    assert code == (17 if command[0] in ("calibrate", "sweep") else 0), output


def test_res_post_norm_is_refused_bare_and_named_in_its_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rpn = timm.create_model("vit_base_patch16_rpn_224", embed_dim=192, num_heads=3, depth=1, img_size=32,
                            num_classes=0).eval()  # timm's res-post-norm ViT (ResPostBlock)
    bare = _save(rpn, tmp_path / "bare" / "model.safetensors")
    with pytest.raises(CheckpointError, match="block kind"):
        load_model(bare)
    hub = _save(rpn, tmp_path / "hub" / "model.safetensors")
    args = {"embed_dim": 192, "num_heads": 3, "depth": 1, "img_size": 32, "num_classes": 0}
    (hub.parent / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_rpn_224",
                                                         "model_args": args}))
    with pytest.raises(CheckpointError, match="ResPostBlock"):
        load_model(hub)
    pickle = tmp_path / "rpn.pth"
    torch.save(rpn.state_dict(), pickle)  # the key order shows it: refused even when the caller asserts pre-norm
    with pytest.raises(CheckpointError, match="res-post-norm"):
        load_model(pickle, num_heads=3)


def test_timm_training_checkpoint_states_its_model(tmp_path: Path) -> None:
    """timm train.py's {"arch", "args", "state_dict"}: args.model and args.model_kwargs state heads and block."""
    model = _six_head_vit()
    args = argparse.Namespace(model="vit_tiny_patch16_224", lr=1e-3,
                              model_kwargs={"num_heads": HEADS, "depth": 2, "img_size": IMG, "num_classes": 0})
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "arch": args.model, "state_dict": model.state_dict(), "args": args, "version": 2}, path)
    loaded = load_model(path)
    assert loaded.model.blocks[0].attn.num_heads == HEADS
    assert loaded.arch.provenance["num_heads"].startswith("model_best.pth.tar's timm training record")
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _cosine(loaded.model(images), model(images)) > 0.9999


def test_a_pickled_timm_model_states_its_heads(tmp_path: Path) -> None:
    """``torch.save(model)``, read with ``trust_pickle``: its blocks state their head count (6, where timm's 192-wide
    models have 3), alone or in a training wrapper; ``create_model``'s ``pretrained_cfg`` names the architecture.
    It was refused as stating no head count, though the file holds the model itself."""
    model = _six_head_vit()
    images = torch.randn(2, 3, IMG, IMG)
    for path, saved in ((tmp_path / "model.pth", model), (tmp_path / "wrapped.pth", {"model": model, "epoch": 3})):
        torch.save(saved, path)
        with pytest.raises(CheckpointError, match="arbitrary code"):  # still only with the opt-in
            load_model(path)
        loaded = load_model(path, trust_pickle=True)
        assert loaded.model.blocks[0].attn.num_heads == HEADS
        assert loaded.arch.provenance["num_heads"] == f"{path.name}'s pickled timm model (attn.num_heads of its blocks)"
        with torch.no_grad():
            assert _cosine(loaded.model(images), model(images)) > 0.9999
    torch.manual_seed(0)
    named = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=IMG).eval()
    torch.save(named, tmp_path / "deit.pth")
    loaded = load_model(tmp_path / "deit.pth", trust_pickle=True)
    assert loaded.model.blocks[0].attn.num_heads == 3 and loaded.arch.name == "deit_tiny_patch16_224"
    with torch.no_grad():
        assert _cosine(loaded.model(images), named(images)) > 0.9999


def test_a_config_of_another_width_is_not_taken_as_evidence(tmp_path: Path) -> None:
    path = _save(_six_head_vit(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224"}))  # 384 wide
    with pytest.raises(CheckpointError, match=r"384-wide model .* the checkpoint is 192 wide"):
        load_model(path)


def test_layer_scale_weights_state_the_block_kind(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dino = timm.create_model("vit_small_patch14_dinov2", depth=1, img_size=28).eval()  # ls1/ls2: pre-norm Block
    path = _save(dino, tmp_path / "dino.safetensors")
    with pytest.raises(CheckpointError, match="does not state its head count") as caught:
        load_model(path)
    assert "block kind" not in str(caught.value)  # stated by the layer scale; only the head count is missing
    assert caught.value.hint is not None and caught.value.hint.value == "vit_small_patch14_dinov2"
    loaded = load_model(path, num_heads=6)
    assert loaded.model.blocks[0].attn.num_heads == 6 and "layer scale" in loaded.arch.provenance["block"]


def test_num_heads_on_a_timm_name_builds_that_many_heads() -> None:
    loaded = load_model("deit_tiny_patch16_224", num_heads=HEADS, img_size=32)  # random weights
    assert loaded.model.blocks[0].attn.num_heads == HEADS and loaded.arch.provenance["num_heads"] == "given"
    with pytest.raises(CheckpointError, match="divisible by num_heads"):
        load_model("deit_tiny_patch16_224", num_heads=5, img_size=32)
