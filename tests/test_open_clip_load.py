"""open_clip checkpoints read into their visual tower: a hub folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), a training ``.pt`` (``{"state_dict": {"module.visual.*": ...}}``) with its config
named by ``--arch open_clip:...``, at the config's size and at another; the text tower is not loaded; bad configs
and sizes are refused before any weight is read; and ``tofu-export FOLDER`` exports it end to end (one process
per command, as a user runs it).

The model is a tiny random open_clip ``CLIP`` (vision: width 64, 2 layers, 2 heads, 64 px, patch 16: 17 tokens).
The reference is open_clip's own ``create_model("local-dir:FOLDER")``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from two_towers import OPEN_CLIP_IMG, OPEN_CLIP_PREPROCESS, OPEN_CLIP_VISION

open_clip = pytest.importorskip("open_clip")

from tofu_export import load_model  # noqa: E402
from tofu_export.checkpoint import CheckpointError  # noqa: E402
from tofu_export.models import open_clip_load  # noqa: E402
from tofu_export.models.family import family_for_checkpoint, patched  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread", "shared_traces"), pytest.mark.filterwarnings("ignore")]

IMG = OPEN_CLIP_IMG
CONFIG = {"embed_dim": 32, "vision_cfg": OPEN_CLIP_VISION,
          "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
PREPROCESS = OPEN_CLIP_PREPROCESS


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A hub folder, a training checkpoint beside no config, and a bare safetensors file beside no config."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = open_clip.CLIP(**CONFIG).state_dict()
    root = tmp_path_factory.mktemp("open_clip")
    hub, train, bare = root / "hub", root / "train", root / "bare"
    for folder in (hub, train, bare):
        folder.mkdir()
    save_file(state, hub / "open_clip_model.safetensors")
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIG, "preprocess_cfg": PREPROCESS}))
    (root / "tiny.json").write_text(json.dumps(CONFIG))  # a bare model config, as open_clip ships them
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 0.1}]}},
               train / "epoch_3.pt")
    save_file(state, bare / "model.safetensors")
    return {"hub": hub, "train": train / "epoch_3.pt", "bare": bare / "model.safetensors", "json": root / "tiny.json"}


@pytest.fixture(scope="module")
def reference(files: dict[str, Path]) -> torch.nn.Module:
    return open_clip.create_model(f"local-dir:{files['hub']}").eval()


def _images(size: int = IMG) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_hub_folder_is_the_visual_tower_only(files: dict[str, Path], reference: torch.nn.Module,
                                             monkeypatch: pytest.MonkeyPatch, safetensors_reads: list[str]) -> None:
    asked = safetensors_reads
    monkeypatch.setattr(open_clip_load, "load_state_dict", None)  # the whole-file reader is not used
    assert family_for_checkpoint(files["hub"]).name == "open_clip"
    loaded = load_model(files["hub"])
    tower = loaded.model
    assert type(tower).__name__ == "VisionTransformer" and loaded.family.name == "open_clip"
    assert asked and all(key.startswith("visual.") for key in asked)
    assert len(asked) == len(tower.state_dict())  # every tower tensor, nothing else
    assert loaded.arch.kwargs["heads"] == 2 and "beside the checkpoint" in loaded.arch.provenance["heads"]
    assert loaded.family.data_config(tower)["mean"] == tuple(PREPROCESS["mean"]) and loaded.img_size == IMG
    from tofu_export.models.loading import checkpoint_digest  # what eval checks an artifact's checkpoint by

    assert checkpoint_digest(files["hub"]) == loaded.sha256
    with torch.no_grad():
        torch.testing.assert_close(tower(_images()), reference.encode_image(_images()), rtol=0, atol=0)


def test_training_checkpoint_with_its_config_named(files: dict[str, Path], reference: torch.nn.Module) -> None:
    assert family_for_checkpoint(files["train"]).name == "open_clip"  # from its keys: module.visual.*
    loaded = load_model(files["train"], arch=f"open_clip:{files['json']}")
    assert loaded.arch.name == f"open_clip:{files['json']}" and loaded.sha256 is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_images()), reference.encode_image(_images()), rtol=0, atol=0)


def test_another_input_size_resamples_the_positions_as_open_clip_does(files: dict[str, Path]) -> None:
    loaded = load_model(files["hub"], img_size=96)
    assert loaded.img_size == 96 and loaded.family.num_tokens(loaded.model) == 37 and loaded.arch.notes
    assert loaded.arch.provenance["image_size"] == "--img-size"
    forced = open_clip.create_model(f"local-dir:{files['hub']}", force_image_size=96).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(_images(96)), forced.encode_image(_images(96)), rtol=0, atol=0)


@pytest.mark.parametrize(("which", "arch", "img_size", "message", "option"), [
    ("bare", None, None, "model config it was trained with is not in the weights", "arch"),
    ("bare", "open_clip:ViT-B-99", None, "no model config named 'ViT-B-99'; did you mean ViT-B-32", "arch"),
    ("bare", "open_clip:ViT-B-32", None,
     r"config ViT-B-32.*the weights are width 64, 2 layers, patch 16.*the config width 768, 12 layers", "arch"),
    ("bare", "open_clip:coca_ViT-B-32", None, "pools with attention", "arch"),
    ("bare", "open_clip:ViT-B-16-SigLIP", None,
     "does not fit the open_clip config ViT-B-16-SigLIP.*the timm model vit_base_patch16_siglip_224", "arch"),
    ("bare", "open_clip:vit_medium_patch16_gap_256", None, "followed by a linear projection", "arch"),
    ("hub", None, 70, "multiple of its patch", "img_size"),
])
def test_bad_configs_and_sizes_are_refused_before_reading_weights(
        files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, which: str, arch: str | None, img_size: int | None,
        message: str, option: str) -> None:
    monkeypatch.setattr(open_clip_load, "read_tower", None)  # reading a weight would fail the test
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(files[which], arch=arch, img_size=img_size)
    assert caught.value.hint is not None and caught.value.hint.option == option


def test_pickled_objects_need_trust(files: dict[str, Path], tmp_path: Path) -> None:
    state = open_clip.CLIP(**CONFIG).state_dict()
    torch.save({"state_dict": state, "args": Path("x")}, tmp_path / "epoch_1.pt")
    with pytest.raises(CheckpointError, match="beyond tensors") as caught:
        load_model(tmp_path / "epoch_1.pt", arch=f"open_clip:{files['json']}")
    assert caught.value.hint.option == "trust_pickle"
    assert load_model(tmp_path / "epoch_1.pt", arch=f"open_clip:{files['json']}", trust_pickle=True).img_size == IMG


@pytest.mark.slow
def test_cli_exports_a_hub_folder_and_refuses_a_wrong_config(files: dict[str, Path], tmp_path: Path) -> None:
    """``tofu-export FOLDER``: exit 0, parity and the TensorRT check in the manifest, the ONNX graph computes the
    patched tower; a config that does not fit is exit 2 with one line naming ``--arch``, and writes nothing."""
    import onnxruntime
    from typer.testing import CliRunner

    from tofu_export.cli.app import app

    def invoke(*args: str):  # in this process: the command's own error boundary, as the console script's
        return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})

    with pytest.MonkeyPatch.context() as patcher:
        patcher.chdir(tmp_path)
        done = invoke("export", str(files["hub"]), "-r", "2", "--out", "out", "--no-bench", "--json")
        wrong = invoke("export", str(files["bare"]), "--arch", "open_clip:ViT-B-32", "--out", "wrong")
    assert done.exit_code == 0, done.output[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["arch"]["name"].startswith("open_clip:") and manifest["onnx"]["parity"]["ok"]
    assert manifest["tofu"]["tokens"] == [17, 15] and manifest["tensorrt_check"]["per_target"]["10"]
    assert manifest["onnx"]["exporter"] == "dynamo"
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    tower = load_model(files["hub"]).model
    with torch.no_grad(), patched(tower, r=2, mode="tofu", img_size=IMG):
        expected = tower(_images()).numpy()
    got = session.run(None, {session.get_inputs()[0].name: _images().numpy()})[0]
    assert abs(got - expected).max() < 1e-5
    assert wrong.exit_code == 2 and "Traceback" not in wrong.output
    error = wrong.stderr.partition("error:")[2].strip().split("\n")
    assert len(error) == 1 and "does not fit the open_clip config ViT-B-32" in error[0] and "--arch" in error[0]
    assert not (tmp_path / "wrong").exists()


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_the_eval_transform_is_open_clips(files: dict[str, Path], resize_mode: str, tmp_path: Path) -> None:
    """The transform the quick look, calibration and eval use, and the manifest records, is open_clip's own eval
    transform (the shorter side resized to the model's size then a center crop, or a squash; bicubic): it was
    timm's default resize to 1/0.875 of the size and crop."""
    import numpy as np
    from PIL import Image

    from tofu_export.evaluation.data import model_transform

    preprocess = {**PREPROCESS, "resize_mode": resize_mode, "interpolation": "bicubic"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIG, "preprocess_cfg": preprocess}))
    (tmp_path / "open_clip_model.safetensors").write_bytes((files["hub"] / "open_clip_model.safetensors").read_bytes())
    tower = load_model(tmp_path).model
    theirs = open_clip.image_transform(IMG, is_train=False, mean=PREPROCESS["mean"], std=PREPROCESS["std"],
                                       resize_mode=resize_mode, interpolation="bicubic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8))
    torch.testing.assert_close(model_transform(tower)(image), theirs(image), rtol=0, atol=1e-6)
