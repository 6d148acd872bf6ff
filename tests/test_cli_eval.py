"""`tofu-export eval` end to end (in-process): a checkpoint, and a deployed ONNX artifact against its reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from tofu_export.cli import app

pytestmark = pytest.mark.usefixtures("shared_traces")  # one dynamo trace per distinct model (trace_cache)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=3)
    save_file(model.state_dict(), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))  # heads, block kind
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / "data" / str(label)).mkdir(parents=True)
        for k in range(2):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data" / str(label) / f"{k}.png")
    return {"checkpoint": root / "model.safetensors", "data": root / "data", "root": root}


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    return result.exit_code, result.output


def _top1_by_hand(model: torch.nn.Module, data: Path) -> float:
    """Top-1 in % of ``model`` on the ImageFolder ``data``, computed without the evaluation package's loops."""
    from tofu_export.evaluation import image_folder, model_transform

    dataset = image_folder(data, model_transform(model))
    with torch.no_grad():
        hits = [int(model(image.unsqueeze(0)).argmax()) == label for image, label in dataset]
    return 100.0 * sum(hits) / len(hits)


def test_eval_of_a_checkpoint_scores_reference_and_candidate(files: dict[str, Path]) -> None:
    """The reported top-1 of both models is what they really score on these images, and r=0 changes nothing."""
    import copy

    from tofu_export import patch
    from tofu_export.models.loading import load_model

    code, output = _invoke("eval", str(files["checkpoint"]), str(files["data"]), "--r", "2", "--mode", "tome",
                           "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    assert report["task"] == "classification" and report["n_eval"] == 6
    reference = load_model(files["checkpoint"]).model
    candidate = patch(copy.deepcopy(reference), r=2, mode="tome")
    assert report["metrics"]["reference_top1"] == pytest.approx(_top1_by_hand(reference, files["data"]))
    assert report["metrics"]["candidate_top1"] == pytest.approx(_top1_by_hand(candidate, files["data"]))

    code, output = _invoke("eval", str(files["checkpoint"]), str(files["data"]), "--r", "0", "--json")
    assert code == 0, output
    metrics = json.loads(output[output.index("{"):])["metrics"]
    assert metrics["candidate_top1"] == metrics["reference_top1"]
    assert metrics["candidate_top5"] == metrics["reference_top5"]


def test_eval_of_an_artifact_needs_its_reference(files: dict[str, Path], tiny_checkpoint: Path,
                                                 tiny_export: Path) -> None:
    """On the shared export (``conftest.tiny_export``): what is under test is eval, not the export."""
    bare = files["root"] / "bare"  # the graph alone, without the manifest that names its checkpoint
    bare.mkdir()
    (bare / "model.onnx").write_bytes((tiny_export / "model.onnx").read_bytes())
    code, output = _invoke("eval", str(bare / "model.onnx"), str(files["data"]))
    assert code == 2 and "--reference" in output
    code, output = _invoke(
        "eval", str(bare / "model.onnx"), str(files["data"]), "--reference", str(tiny_checkpoint), "--json",
        "--no-compare-tome",
    )
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    assert report["candidate"] == str(bare / "model.onnx")
    assert report["n_eval"] == 6  # 3 class folders of 2 images
    code, output = _invoke("eval", str(tiny_export / "model.onnx"), str(files["data"]), "--json")  # by the manifest
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    assert report["r"] == [2, 2] and report["tome"]["candidate_top1"] >= 0


def test_eval_of_a_missing_folder_is_a_user_error(files: dict[str, Path]) -> None:
    code, output = _invoke("eval", str(files["checkpoint"]), str(files["root"] / "nowhere"))
    assert code == 2 and "nowhere" in output


def test_the_artifact_folder_export_printed_is_taken_as_its_graph(files: dict[str, Path], tiny_export: Path,
                                                                  tmp_path: Path) -> None:
    """eval, profile and check take the folder ``export`` names ("exported to out"); another folder is a checkpoint
    folder as before, and a graph the folder lacks is named with what it holds."""
    from tofu_export.artifacts import graph_in
    from tofu_export.errors import UserError

    assert graph_in(tiny_export) == tiny_export / "model.onnx" and graph_in(tiny_export / "model.onnx").is_file()
    assert graph_in(files["root"]) == files["root"]  # not an artifact: a transformers / open_clip folder stays one
    with pytest.raises(UserError, match=r"artifact folder without model\.engine \(it holds manifest\.json, model"):
        graph_in(tiny_export, engine=True)
    code, output = _invoke("eval", str(tiny_export), str(files["data"]), "--json", "--no-compare-tome")
    assert code == 0, output
    assert json.loads(output[output.index("{"):])["candidate"] == str(tiny_export / "model.onnx")
    code, output = _invoke("check", str(tiny_export), "--json")
    assert code == 0 and json.loads(output)["ok"] is True, output
    report = tmp_path / "profile.md"
    code, output = _invoke("profile", str(tiny_export), "--iters", "2", "--warmup", "0", "--no-breakdown", "--report",
                           str(report))
    assert code == 0 and f"Latency profile of {tiny_export / 'model.onnx'}" in report.read_text(), output


def test_eval_of_a_backbone_pairs_its_cosines_with_tomes_image_by_image(files: dict[str, Path], tmp_path: Path) -> None:
    """A headless model: the candidate's cosine minus ToMe's on the same images, with the SE of that difference."""
    import copy

    from tofu_export import patch
    from tofu_export.evaluation import image_folder, model_transform
    from tofu_export.evaluation.metrics import cosine_per_image

    torch.manual_seed(0)
    backbone = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=0)
    save_file(backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    (tmp_path / "backbone.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))
    code, output = _invoke("eval", str(tmp_path / "backbone.safetensors"), str(files["data"]), "--r", "4", "--json")
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    paired = report["vs_tome"]
    assert report["task"] == "fidelity" and paired["images"] == report["n_eval"] == 6
    images = torch.stack([image for image, _ in image_folder(files["data"], model_transform(backbone))])
    with torch.no_grad():  # by hand: both reductions against the unreduced backbone, image by image
        plain = backbone(images)
        mine = cosine_per_image(plain, patch(copy.deepcopy(backbone), r=4, mode="tofu")(images))
        tome = cosine_per_image(plain, patch(copy.deepcopy(backbone), r=4, mode="tome")(images))
    diffs = mine - tome
    assert paired["difference"] == pytest.approx(float(diffs.mean()), abs=1e-6)
    assert paired["standard_error"] == pytest.approx(float(diffs.std() / 6**0.5), abs=1e-6)
    assert paired["difference"] == pytest.approx(report["metrics"]["cosine_mean"] - report["tome"]["cosine_mean"])
    code, text = _invoke("eval", str(tmp_path / "backbone.safetensors"), str(files["data"]), "--r", "4")
    assert code == 0 and f"{paired['difference']:+.5f} ± {paired['standard_error']:.5f}" in text, text


def test_eval_at_another_input_size_loads_the_checkpoint_at_that_size(files: dict[str, Path]) -> None:
    """``--img-size`` reaches the load (it was taken by the reduction's plan only: the 64 px model then refused 32 px
    inputs with an internal error); the reference is the checkpoint at that size too."""
    from tofu_export.models.loading import load_model

    code, output = _invoke("eval", str(files["checkpoint"]), str(files["data"]), "--img-size", "32", "--r", "1",
                           "--json", "--no-compare-tome")
    assert code == 0, output
    report = json.loads(output[output.index("{"):])
    assert report["r"] == [1, 1]  # 5 tokens at 32 px: one a block
    reference = load_model(files["checkpoint"], img_size=32).model
    assert report["metrics"]["reference_top1"] == pytest.approx(_top1_by_hand(reference, files["data"]))
