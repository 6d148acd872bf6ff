"""``clean-checkpoint``: a training checkpoint's weights (the EMA copy on request) as .safetensors with the
architecture its training record names beside them, read back by every command as the model it was."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tofu_export.checkpoint import CheckpointError, read_checkpoint
from tofu_export.clean_checkpoint import CleanCheckpointError, clean_checkpoint
from tofu_export.cli.app import app
from tofu_export.hashing import sha256_file
from tofu_export.models.loading import load_model

NAME, KWARGS = "deit_tiny_patch16_224", {"depth": 2, "img_size": 32}


@pytest.fixture
def training_checkpoint(tmp_path: Path, make_vit) -> tuple[Path, dict, dict]:
    """timm train.py's layout with --model-ema: the record, the trained weights and a different EMA copy."""
    trained, ema = make_vit(NAME, seed=0, **KWARGS).state_dict(), make_vit(NAME, seed=1, **KWARGS).state_dict()
    path = tmp_path / "last.pth.tar"
    args = argparse.Namespace(model=NAME, model_kwargs=KWARGS)
    torch.save({"arch": NAME, "args": args, "state_dict": trained, "state_dict_ema": ema, "epoch": 3}, path)
    return path, trained, ema


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_ema_copy_is_written_with_its_architecture_and_loads_as_that_model(training_checkpoint, tmp_path) -> None:
    path, trained, ema = training_checkpoint
    result = clean_checkpoint(path, tmp_path / "out" / "ema.safetensors", use_ema=True)
    assert result.source_key == "state_dict_ema" and result.tensors == len(ema)
    assert _equal(load_file(result.weights), ema) and not _equal(load_file(result.weights), trained)
    stated = json.loads(result.sidecar.read_text())
    assert stated == {"architecture": NAME, "model_args": KWARGS, "source": "last.pth.tar",
                      "source_sha256": sha256_file(path), "weights": "state_dict_ema"}
    loaded = load_model(result.weights)  # the sidecar states what the bare weights cannot (the head count)
    assert loaded.arch.name == NAME and loaded.img_size == 32 and loaded.sha256 == sha256_file(result.weights)
    assert _equal(loaded.model.state_dict(), ema)
    assert read_checkpoint(path, use_ema=True)[1]["weights"] == "state_dict_ema"


def test_without_use_ema_the_trained_weights_are_written(training_checkpoint, tmp_path) -> None:
    path, trained, _ = training_checkpoint
    result = clean_checkpoint(path, tmp_path / "trained.safetensors")
    assert result.source_key == "state_dict" and _equal(load_file(result.weights), trained)


def test_a_file_without_an_ema_copy_is_refused_and_nothing_is_written(tmp_path, make_vit) -> None:
    path = tmp_path / "plain.pth"
    torch.save({"model": make_vit(NAME, **KWARGS).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"holds no EMA copy .*'model'.*drop --use-ema"):
        clean_checkpoint(path, tmp_path / "ema.safetensors", use_ema=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pth"]
    result = clean_checkpoint(path, tmp_path / "plain.safetensors")  # no record: weights only, no sidecar
    assert result.sidecar is None and result.architecture is None and not (tmp_path / "plain.json").exists()


@pytest.mark.parametrize("existing", ["ema.safetensors", "ema.json"])
def test_nothing_is_replaced(training_checkpoint, tmp_path, existing: str) -> None:
    path, _, _ = training_checkpoint
    (tmp_path / existing).write_text("someone else's")
    with pytest.raises(CleanCheckpointError, match=rf"{existing} already exists; tofu-export never replaces"):
        clean_checkpoint(path, tmp_path / "ema.safetensors", use_ema=True)
    assert (tmp_path / existing).read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pth.tar", existing])


def test_a_failed_write_leaves_nothing(training_checkpoint, tmp_path, monkeypatch) -> None:
    """The sidecar is written after the weights: when it fails, the weights file written a moment ago goes too."""
    from tofu_export import clean_checkpoint as module

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module.json, "dumps", broken)
    with pytest.raises(OSError, match="No space left"):
        clean_checkpoint(training_checkpoint[0], tmp_path / "ema.safetensors", use_ema=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth.tar"]  # no weights, sidecar or temporary


def test_the_output_must_be_a_safetensors_name(training_checkpoint, tmp_path) -> None:
    with pytest.raises(CleanCheckpointError, match=r"name the file ema\.safetensors"):
        clean_checkpoint(training_checkpoint[0], tmp_path / "ema.pth", use_ema=True)


def test_the_command_writes_and_says_the_next_step(training_checkpoint, tmp_path) -> None:
    path, _, ema = training_checkpoint
    out = tmp_path / "ema.safetensors"
    result = CliRunner().invoke(app, ["clean-checkpoint", str(path), "--use-ema", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "the weights under 'state_dict_ema' of last.pth.tar" in result.output
    assert f"next: tofu-export {out} --r 16" in result.output
    assert _equal(load_file(out), ema)
    again = CliRunner().invoke(app, ["clean-checkpoint", str(path), "--use-ema", "-o", str(out)])
    assert again.exit_code == 2 and "already exist" in again.output


def test_a_pickled_model_is_written_with_its_heads_and_preprocessing(tmp_path, make_vit) -> None:
    """``torch.save(model)`` of a timm ViT (read with ``--trust-pickle``): the sidecar states the heads the blocks
    have and the preprocessing the model's ``pretrained_cfg`` holds (a DeiT's ImageNet mean, not a ViT's 0.5), so
    the bare weights load as that model without the pickle."""
    model = make_vit(NAME, seed=0, num_heads=6, **KWARGS)  # 6 heads where deit_tiny has 3: only the blocks say so
    path = tmp_path / "model.pth"
    torch.save(model, path)
    result = clean_checkpoint(path, tmp_path / "model.safetensors", trust_pickle=True)
    stated = json.loads(result.sidecar.read_text())
    assert (stated["architecture"], stated["model_args"]) == (NAME, {"num_heads": 6})
    assert stated["pretrained_cfg"]["mean"] == list(model.pretrained_cfg["mean"]) != [0.5, 0.5, 0.5]
    loaded = load_model(result.weights)
    assert loaded.model.blocks[0].attn.num_heads == 6 and _equal(loaded.model.state_dict(), model.state_dict())
    assert tuple(loaded.model.pretrained_cfg["mean"]) == tuple(model.pretrained_cfg["mean"])
    assert loaded.arch.provenance["preprocessing"].startswith("model.json pretrained_cfg (mean, std")
    words = CliRunner().invoke(app, ["clean-checkpoint", str(path), "--trust-pickle", "-o",
                                     str(tmp_path / "again.safetensors")])
    assert f"architecture {NAME} with model_args {{'num_heads': 6}}" in words.output, words.output


@pytest.mark.parametrize(("config", "words"), [("open_clip_config.json", "which every command reads as it is"),
                                               ("", "it holds last.pth.tar")])
def test_a_folder_is_refused_with_what_to_do_instead(tmp_path, config, words) -> None:
    """A checkpoint folder (transformers, open_clip) needs no cleaning; a folder of training checkpoints, one of
    them named."""
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "last.pth.tar").write_bytes(b"")
    if config:
        (folder / config).write_text("{}")
    with pytest.raises(CleanCheckpointError, match=words):
        clean_checkpoint(folder, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
