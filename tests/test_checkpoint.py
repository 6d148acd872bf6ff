"""Tests for tofu_export.checkpoint: safe loading, architecture inference and model building."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from tofu_export.checkpoint import CheckpointError, load_state_dict, read_checkpoint
from tofu_export.cli.errors import render
from tofu_export.hashing import sha256_file
from tofu_export.models.timm_vit_arch import infer_arch
from tofu_export.models.timm_vit_build import build_model
from tofu_export.models.timm_vit_evidence import Evidence

SMALL_DEIT = {"depth": 2, "img_size": 64}


def _vit(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _config(name: str) -> Evidence:
    """What a timm ``config.json`` naming ``name`` beside the checkpoint states (heads, block kind)."""
    return Evidence("config.json", name)


def _outputs(model: nn.Module, img_size: int) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model(torch.randn(2, 3, img_size, img_size))


@pytest.fixture(scope="module")
def tiny_deit() -> nn.Module:
    """deit_tiny with 2 blocks at 64x64: pos_embed [1, 17, 192]."""
    return _vit("deit_tiny_patch16_224", **SMALL_DEIT)


@pytest.fixture(scope="module")
def full_deit_tiny_sd() -> dict[str, torch.Tensor]:
    return _vit("deit_tiny_patch16_224").state_dict()


@pytest.fixture
def tiny_deit_file(tmp_path: Path, tiny_deit: nn.Module) -> Path:
    path = tmp_path / "deit.pth"
    torch.save(tiny_deit.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------------------
# load_state_dict: formats, wrappers, prefixes
# ------------------------------------------------------------------------------------------------------------


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


WRITERS: dict[str, Callable[[dict[str, torch.Tensor], Path], Path]] = {
    "plain": lambda sd, d: _save(sd, d / "plain.pth"),
    "model_wrapper": lambda sd, d: _save({"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}}, d / "w.pt"),
    "state_dict_wrapper": lambda sd, d: _save({"state_dict": sd, "step": 10}, d / "w.bin"),
    "ddp_prefix": lambda sd, d: _save({"model": _prefixed(sd, "module.")}, d / "ddp.pth"),
    "compile_ddp_prefix": lambda sd, d: _save(_prefixed(sd, "_orig_mod.module."), d / "compiled.pth"),
    "legacy_pickle": lambda sd, d: _save(sd, d / "legacy.pth", zip_format=False),
    "safetensors": lambda sd, d: _save_safetensors(sd, d / "w.safetensors"),
    "safetensors_odd_suffix": lambda sd, d: _save_safetensors(sd, d / "weights.dat"),
}


def _save(obj: Any, path: Path, *, zip_format: bool = True) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_round_trip_reproduces_source_outputs(writer: str, tmp_path: Path, tiny_deit: nn.Module) -> None:
    path = WRITERS[writer](tiny_deit.state_dict(), tmp_path)
    loaded = load_state_dict(path)
    assert set(loaded) == set(tiny_deit.state_dict())
    model, guess = build_model(loaded, evidence=_config("deit_tiny_patch16_224"))
    assert not model.training
    assert guess.notes == ()
    torch.testing.assert_close(_outputs(model, 64), _outputs(tiny_deit, 64), rtol=0, atol=0)


def test_model_key_preferred_over_ema(tmp_path: Path, tiny_deit: nn.Module) -> None:
    other = _vit("deit_tiny_patch16_224", seed=1, **SMALL_DEIT).state_dict()
    path = _save({"model_ema": other, "model": tiny_deit.state_dict()}, tmp_path / "ema.pth")
    loaded = load_state_dict(path)
    torch.testing.assert_close(loaded["head.weight"], tiny_deit.state_dict()["head.weight"])
    ema_only = load_state_dict(_save({"state_dict_ema": other, "epoch": 1}, tmp_path / "ema_only.pth"))
    torch.testing.assert_close(ema_only["head.weight"], other["head.weight"])


def test_an_unused_ema_copy_is_said_not_chosen_silently(tmp_path: Path, tiny_deit: nn.Module) -> None:
    """timm's train.py with --model-ema saves state_dict and state_dict_ema: the weights under state_dict are used
    (timm's validate.py without --use-ema), and the loaded model's notes and provenance say an EMA copy was left."""
    from tofu_export.models.loading import load_model

    other = _vit("deit_tiny_patch16_224", seed=1, **SMALL_DEIT).state_dict()
    args = argparse.Namespace(model="deit_tiny_patch16_224", model_kwargs=SMALL_DEIT)
    path = _save({"arch": args.model, "args": args, "state_dict": tiny_deit.state_dict(), "state_dict_ema": other},
                 tmp_path / "last.pth.tar")
    loaded, record = read_checkpoint(path)
    torch.testing.assert_close(loaded["head.weight"], tiny_deit.state_dict()["head.weight"])
    assert record["weights"] == "state_dict" and record["unused_ema"] == "state_dict_ema"
    arch = load_model(path).arch
    assert arch.provenance["weights"] == "state_dict (not state_dict_ema)"
    assert any("EMA copy" in note and "'state_dict_ema'" in note for note in arch.notes), arch.notes
    assert any("tofu-export clean-checkpoint last.pth.tar --use-ema -o last-ema.safetensors" in note
               for note in arch.notes), arch.notes
    assert "unused_ema" not in read_checkpoint(_save({"model_ema": other}, tmp_path / "ema.pth"))[1]
    assert read_checkpoint(_save({"model": other}, tmp_path / "plain.pth"))[1] == {}


def test_wrapper_without_tensors_is_rejected(tmp_path: Path) -> None:
    path = _save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "notensors.pth")
    with pytest.raises(CheckpointError, match="no named tensors") as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# load_state_dict: broken inputs
# ------------------------------------------------------------------------------------------------------------


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


BROKEN: dict[str, Callable[[Path, Path], Path]] = {
    "truncated_zip": lambda good, d: _truncated(good, d / "half.pth"),
    "truncated_legacy": lambda good, d: _truncated(
        _save(torch.load(good), d / "l.pth", zip_format=False), d / "x.pt"
    ),
    "truncated_safetensors": lambda good, d: _truncated(
        _save_safetensors(torch.load(good), d / "ok.safetensors"), d / "half.safetensors"
    ),
    "empty": lambda good, d: _write(d / "empty.pth", b""),
    "random_bytes": lambda good, d: _write(d / "random.pth", random.Random(0).randbytes(4096)),
    "text": lambda good, d: _write(d / "notes.pth", b"this is a README, not weights\n" * 20),
    "zip_without_pickle": lambda good, d: _write(d / "empty_zip.pth", b"PK\x05\x06" + b"\0" * 18),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_raises_checkpoint_error_naming_path(
    case: str, tmp_path: Path, tiny_deit_file: Path
) -> None:
    path = BROKEN[case](tiny_deit_file, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_directory_and_missing_file(tmp_path: Path, tiny_deit_file: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory") as info:
        load_state_dict(tmp_path)
    assert tiny_deit_file.name in str(info.value)  # points at the checkpoint inside
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_state_dict(missing)
    assert str(missing) in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# load_state_dict: pickles carrying Python objects
# ------------------------------------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this object runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_code_carrying_pickle_is_refused_and_not_executed(tmp_path: Path, tiny_deit: nn.Module) -> None:
    marker = tmp_path / "marker"
    path = _save({"model": tiny_deit.state_dict(), "payload": _WritesMarker(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = render(info.value)  # as the CLI prints it: the library's hint names the setting, the CLI its flag
    assert not marker.exists()
    for expected in (str(path), "beyond tensors", "execute", "--trust-pickle"):
        assert expected in message
    assert info.value.hint is not None and info.value.hint.option == "trust_pickle"
    # The payload is live: opting in really runs it (so the assertion above could have failed).
    load_state_dict(path, trust_pickle=True)
    assert marker.read_text() == "pwned"


def test_timm_training_checkpoint_loads_safely_with_its_record(tmp_path: Path, tiny_deit: nn.Module) -> None:
    """timm's train.py saves {"arch": args.model, "args": argparse.Namespace, "state_dict": ...}: the Namespace (an
    inert bag of settings) loads without opt-in, and the record names the model and its --model-kwargs."""
    args = argparse.Namespace(model="deit_tiny_patch16_224", model_kwargs={"depth": 2}, lr=0.1)
    wrapped = {"epoch": 7, "arch": args.model, "state_dict": tiny_deit.state_dict(), "args": args, "version": 2}
    loaded, record = read_checkpoint(_save(wrapped, tmp_path / "checkpoint-7.pth.tar"))
    assert set(loaded) == set(tiny_deit.state_dict())
    assert record == {"architecture": "deit_tiny_patch16_224", "model_args": {"depth": 2}}
    no_args = read_checkpoint(_save({"arch": "visiontransformer", "state_dict": loaded}, tmp_path / "c.pth"))[1]
    assert no_args == {"architecture": "visiontransformer", "model_args": {}}  # a class name: names no timm model


def test_benign_pickle_needs_opt_in(
    tmp_path: Path, tiny_deit: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    wrapped = {"model": tiny_deit.state_dict(), "args": types.SimpleNamespace(lr=0.1), "epoch": 7}
    path = _save(wrapped, tmp_path / "train.pth.tar")
    with pytest.raises(CheckpointError, match=re.escape("types.SimpleNamespace")):
        load_state_dict(path)
    with caplog.at_level(logging.WARNING, logger="tofu_export.checkpoint"):
        loaded = load_state_dict(path, trust_pickle=True)
    assert "code" in caplog.text
    assert set(loaded) == set(tiny_deit.state_dict())


def test_whole_pickled_module_loads_with_opt_in(tmp_path: Path, tiny_deit: nn.Module) -> None:
    path = _save({"model": tiny_deit, "epoch": 1}, tmp_path / "whole_model.pth")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert "--trust-pickle" in render(info.value)
    loaded = load_state_dict(path, trust_pickle=True)
    torch.testing.assert_close(loaded["pos_embed"], tiny_deit.pos_embed.detach())


# ------------------------------------------------------------------------------------------------------------
# infer_arch
# ------------------------------------------------------------------------------------------------------------

INFER_CASES = [
    ("deit_tiny_patch16_224", {"depth": 2, "img_size": 64}),
    ("deit_tiny_distilled_patch16_224", {"depth": 2, "img_size": 48}),
    ("vit_small_patch14_dinov2", {"depth": 1, "img_size": 70}),
    ("vit_small_patch14_reg4_dinov2", {"depth": 1, "img_size": 56}),
    ("vit_base_patch16_224", {"depth": 1, "img_size": 32, "global_pool": "avg", "num_classes": 10}),
    ("vit_tiny_patch16_224", {"depth": 3, "img_size": 80, "num_classes": 0}),
    ("vit_tiny_patch16_224", {"depth": 1, "img_size": 32, "class_token": False, "global_pool": "avg"}),
]


INFER_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(INFER_CASES)]


@pytest.mark.parametrize(("name", "kwargs"), INFER_CASES, ids=INFER_IDS)
def test_infer_arch_matches_source_model(name: str, kwargs: dict[str, Any]) -> None:
    source = _vit(name, **kwargs)
    guess = infer_arch(source.state_dict(), evidence=_config(name))
    inferred = guess.kwargs
    assert inferred["embed_dim"] == source.embed_dim
    assert inferred["depth"] == len(source.blocks)
    assert inferred["patch_size"] == source.patch_embed.patch_size[0]
    assert inferred["img_size"] == source.patch_embed.img_size[0]
    assert inferred["num_classes"] == source.num_classes
    assert inferred["class_token"] == (source.cls_token is not None)
    assert inferred["no_embed_class"] == source.no_embed_class
    assert inferred["global_pool"] == source.global_pool
    assert inferred["num_heads"] == source.blocks[0].attn.num_heads
    assert (inferred["init_values"] is not None) == isinstance(source.blocks[0].ls1, timm.layers.LayerScale)
    rebuilt, _ = build_model(source.state_dict(), evidence=_config(name))
    assert type(rebuilt) is type(source)
    assert rebuilt.num_prefix_tokens == source.num_prefix_tokens
    img_size = inferred["img_size"]
    torch.testing.assert_close(_outputs(rebuilt, img_size), _outputs(source, img_size), rtol=0, atol=0)


def test_full_deit_tiny_is_named_exactly(full_deit_tiny_sd: dict[str, torch.Tensor]) -> None:
    guess = infer_arch(full_deit_tiny_sd, evidence=_config("deit_tiny_patch16_224"))
    assert guess.name == "deit_tiny_patch16_224"
    assert guess.reason.endswith("→ deit_tiny_patch16_224")  # no overrides needed
    assert "197 tokens" in guess.reason


def test_distilled_and_dinov2_names() -> None:
    distilled = infer_arch(_vit("deit_tiny_distilled_patch16_224", **SMALL_DEIT).state_dict(),
                           evidence=_config("deit_tiny_distilled_patch16_224"))
    assert distilled.name == "deit_tiny_distilled_patch16_224"
    assert "dist" in distilled.reason
    dinov2 = infer_arch(_vit("vit_small_patch14_dinov2", depth=1).state_dict(),  # timm default: 518 px
                        evidence=_config("vit_small_patch14_dinov2"))
    assert dinov2.name == "vit_small_patch14_dinov2"
    assert dinov2.kwargs["img_size"] == 518
    assert dinov2.kwargs["num_classes"] == 0
    assert "1370 tokens" in dinov2.reason


def test_non_vit_state_dict_is_rejected() -> None:
    resnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(CheckpointError, match="not a timm VisionTransformer") as info:
        infer_arch(resnet.state_dict())
    assert "layer1" in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# build_model
# ------------------------------------------------------------------------------------------------------------


def test_explicit_equivalent_arch_loads(full_deit_tiny_sd: dict[str, torch.Tensor]) -> None:
    model, guess = build_model(full_deit_tiny_sd, arch="vit_tiny_patch16_224")
    assert guess.name == "vit_tiny_patch16_224"
    assert "deit_tiny_patch16_224" in guess.reason
    torch.testing.assert_close(model.state_dict()["pos_embed"], full_deit_tiny_sd["pos_embed"])


def test_wrong_arch_reports_shapes_and_suggests_inferred() -> None:
    small = _vit("deit_small_patch16_224", **SMALL_DEIT).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch") as info:
        build_model(small, arch="deit_tiny_patch16_224")
    message = render(info.value)
    assert "--arch deit_small_patch16_224" in message
    assert "model expects [192" in message and "checkpoint has [384" in message
    assert message.count("\n  - ") == 5  # at most 5 offending keys listed


def test_unknown_arch_lists_close_matches(full_deit_tiny_sd: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="Unknown timm model name") as info:
        build_model(full_deit_tiny_sd, arch="deit_tiny_patch16_22")
    assert "deit_tiny_patch16_224" in str(info.value)


def test_img_size_resamples_pos_embed(tiny_deit: nn.Module) -> None:
    model, guess = build_model(tiny_deit.state_dict(), img_size=96, evidence=_config("deit_tiny_patch16_224"))
    assert any("resampled" in note and "4x4" in note and "6x6" in note for note in guess.notes)
    assert guess.kwargs["img_size"] == 96
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 192)
    torch.testing.assert_close(model.pos_embed[:, :1], tiny_deit.pos_embed[:, :1])  # cls position untouched
    assert _outputs(model, 96).shape == (2, 1000)


def test_img_size_must_be_multiple_of_patch(tiny_deit: nn.Module) -> None:
    with pytest.raises(CheckpointError, match="multiple of the checkpoint's patch size 16"):
        build_model(tiny_deit.state_dict(), img_size=100, evidence=_config("deit_tiny_patch16_224"))


def test_strict_controls_missing_keys(tiny_deit: nn.Module) -> None:
    partial = {k: v for k, v in tiny_deit.state_dict().items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match=re.escape("head.bias: missing from checkpoint")):
        build_model(partial, evidence=_config("deit_tiny_patch16_224"))
    _, guess = build_model(partial, strict=False, evidence=_config("deit_tiny_patch16_224"))
    assert guess.notes == ("1 missing keys ignored (strict=False)",)


def test_a_taken_state_dict_becomes_the_model_without_a_copy(tiny_deit: nn.Module) -> None:
    """``take_weights``: the model holds the given tensors (no random init, no second copy), in its own dtypes;
    without it, or with keys missing, it holds copies."""
    config = _config("deit_tiny_patch16_224")
    expected = _outputs(tiny_deit, 64)
    given = {k: v.clone() for k, v in tiny_deit.state_dict().items()}
    taken, _ = build_model(given, take_weights=True, evidence=config)
    assert all(t.data_ptr() == given[k].data_ptr() for k, t in taken.state_dict().items())
    assert not taken.training and not any(p.is_meta for p in taken.parameters())
    assert all(p.requires_grad for p in taken.parameters())  # as a built model's
    torch.testing.assert_close(_outputs(taken, 64), expected, rtol=0, atol=0)
    copied, _ = build_model(given, evidence=config)
    assert not any(t.data_ptr() == given[k].data_ptr() for k, t in copied.state_dict().items())
    half = {k: v.half() for k, v in tiny_deit.state_dict().items()}
    from_half, _ = build_model(half, take_weights=True, evidence=config)
    assert {p.dtype for p in from_half.parameters()} == {torch.float32}
    torch.testing.assert_close(from_half.pos_embed, half["pos_embed"].float(), rtol=0, atol=0)
    partial = {k: v for k, v in given.items() if k != "head.bias"}  # strict=False: the missing key is initialised
    model, _ = build_model(partial, strict=False, take_weights=True, evidence=config)
    assert not model.head.bias.is_meta and model.head.bias.data_ptr() != 0
    assert model.blocks[0].attn.qkv.weight.data_ptr() != given["blocks.0.attn.qkv.weight"].data_ptr()


def test_loading_a_file_takes_its_weights(tiny_deit_file: Path, tiny_deit: nn.Module,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tofu_export import load_model
    from tofu_export.models import timm_vit_build

    taken: list[bool] = []
    with_weights = timm_vit_build._with_weights

    def spy(meta_model: nn.Module, weights: dict, create: Callable[[], nn.Module], take: bool) -> nn.Module:
        taken.append(take)
        return with_weights(meta_model, weights, create, take)

    monkeypatch.setattr(timm_vit_build, "_with_weights", spy)
    loaded = load_model(tiny_deit_file, num_heads=3)
    assert taken == [True]  # the file's tensors are nobody else's
    assert not any(t.is_meta for t in loaded.model.state_dict().values())
    torch.testing.assert_close(_outputs(loaded.model, 64), _outputs(tiny_deit, 64), rtol=0, atol=0)


def test_sha256_file_streams(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    path = _write(tmp_path / "blob.bin", data)
    assert sha256_file(path, chunk_bytes=7) == hashlib.sha256(data).hexdigest()
