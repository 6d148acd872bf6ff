"""Read a transformers ``save_pretrained`` folder (``config.json`` + ``model.safetensors``, or a sharded index;
``pytorch_model.bin`` only with ``trust_pickle``) into a wrapped, eval-mode model, at the config's input size or
at ``img_size`` (rebuilt for it by ``hf_vit_resize.resized``).

The class comes from ``arch`` or the config's ``architectures`` (a two-tower ``CLIPModel`` / ``SiglipModel``: its
vision class, ``hf_vit_towers``); every value of the architecture is the config's
own (the head count included: ``num_attention_heads``), so the provenance of each is ``config.json``. Weights files
are checked by ``checkpoint.load_state_dict`` first (its limits and value checks), then transformers reads them
(it renames the keys of older checkpoints); any missing, unexpected or mis-shaped key is an error. A folder
``finetune`` wrote (``save_folder``) holds its statement too (``tuned.FOLDER_STATEMENT``), which ``loading`` notes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tofu_export.checkpoint import CheckpointError, load_state_dict
from tofu_export.errors import Hint
from tofu_export.hashing import sha256_file
from tofu_export.models.family import ArchGuess, LoadedModel
from tofu_export.models.hf_vit_resize import check_size, resized
from tofu_export.models.hf_vit_specs import SUPPORTED, HFVisionEncoder
from tofu_export.models.hf_vit_towers import load_text_tower, load_vision_tower, save_whole, vision_class
from tofu_export.models.write_back import check_unchanged

__all__ = ["folder_digest", "load_folder", "load_text", "save_folder"]

_SAFE = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "mlp_ratio",
                "patch_size", "image_size", "num_register_tokens", "projection_dim", "num_labels")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise CheckpointError(
            "this folder holds a Hugging Face transformers model, and transformers is not installed",
            hint=Hint("checkpoint", None, "pip install 'tofu-export[hf]'"),
        ) from error
    return transformers


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{folder / 'config.json'} is not readable JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} holds no JSON object")
    return config


def _class_name(folder: Path, config: dict[str, Any], arch: str | None) -> str:
    named = config.get("architectures") or []
    name = arch or (named[0] if isinstance(named, list) and named else None)
    if name in SUPPORTED:
        return str(name)
    said = f"--arch {arch}" if arch else f"config.json names {named or 'no architecture'}"
    raise CheckpointError(
        f"{folder}: {said}; tofu-export reads the transformers vision classes {', '.join(SUPPORTED)}",
        hint=Hint("arch", None, "with one of these class names"),
    )


def _weights_files(folder: Path, trust_pickle: bool) -> tuple[list[Path], bool]:
    """The weights files (shards included) and whether they are safetensors."""
    for names, safe in ((_SAFE, True), (_PICKLED, False)):
        for name in names:
            path = folder / name
            if not path.is_file():
                continue
            if not safe and not trust_pickle:
                raise CheckpointError(
                    f"{folder} holds only pickled weights ({name}), which can run code when loaded",
                    hint=Hint("trust_pickle", None, "if you trust the file, or save it with safe_serialization"),
                )
            if not name.endswith(".index.json"):
                return [path], safe
            try:
                shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"{path} is not a readable shard index: {error}") from error
            return [folder / Path(shard).name for shard in shards], safe
    raise CheckpointError(f"{folder} has a config.json but no model.safetensors (or pytorch_model.bin)")


def _folder_digest(files: list[Path], folder: Path) -> str:
    """The config's and the weights' hashes, combined (one file: that file's hash)."""
    import hashlib

    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for path in [folder / "config.json", *files]:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def load_folder(folder: Path, *, arch: str | None, img_size: int | None, trust_pickle: bool) -> LoadedModel:
    """The model ``folder`` holds, wrapped in ``HFVisionEncoder``, eval mode; of a two-tower model (``CLIPModel``,
    ``SiglipModel``) its vision tower (``hf_vit_towers``)."""
    config = _read_config(folder)
    own = vision_class(config)  # (the two-tower class, its vision class) the folder holds, or None
    towers = vision_class({"architectures": [arch]}) if arch else own  # --arch CLIPModel, or the config's
    if towers is None and own is not None and arch == own[1]:  # --arch CLIPVisionModelWithProjection on a CLIPModel
        towers = own
    name = towers[1] if towers else _class_name(folder, config, arch)
    transformers = _transformers()
    stated = config.get("vision_config") if towers else config  # the vision tower's own values
    stated = stated if isinstance(stated, dict) else {}
    if img_size is not None and isinstance(stated.get("patch_size"), int) and isinstance(stated.get("image_size"), int):
        check_size(stated["patch_size"], stated["image_size"], img_size, str(folder))  # before reading weights
    files, safe = _weights_files(folder, trust_pickle)
    if towers:  # its weights read once, by load_state_dict (limits, dtypes and values checked)
        with _without_progress_bars():
            model = load_vision_tower(folder, towers[0], files, trust_pickle)
    else:
        for path in files:
            load_state_dict(path, trust_pickle=trust_pickle)  # limits, dtypes and values checked before transformers
        model_class = getattr(transformers, name)
        try:
            with _without_progress_bars():
                model, info = model_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=safe,
                                                          output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"transformers could not read {folder} as {name}: {error}") from error
        _check_loading(folder, name, info)
    size = model.config.image_size
    if img_size is not None and img_size != size:
        model = resized(model, img_size)  # position embeddings resampled once, as transformers does per call
    preprocess = _preprocess(folder)
    values = {key: stated[key] for key in _ARCH_FIELDS if key in stated}
    if towers and "projection_dim" in config:
        values["projection_dim"] = config["projection_dim"]
    values["image_size"] = model.config.image_size
    source = (f"the vision tower of the {towers[0]} config.json names (its text tower not loaded)" if towers else
              f"{name} from {'--arch' if arch else 'config.json architectures'}")
    guess = ArchGuess(
        name=name, kwargs=values,
        reason=f"{source}, every value from config.json ({values.get('num_attention_heads', '?')} attention heads)",
        notes=(f"position embeddings resampled from {size} to {img_size} px (bicubic, as transformers' "
               "interpolate_pos_encoding)",) if model.config.image_size != size else (),
        provenance={"architecture": "--arch" if arch else "config.json", **{k: "config.json" for k in values},
                    **({"image_size": "--img-size"} if model.config.image_size != size else {})},
    )
    return LoadedModel(HFVisionEncoder(model.eval(), preprocess), guess, folder, _folder_digest(files, folder))


def load_text(folder: Path, *, trust_pickle: bool) -> Any:
    """The text tower of the two-tower model in ``folder`` as ``prompts [K] -> embeddings [K, D]``
    (``hf_vit_towers.load_text_tower``), or None where the folder holds a vision model alone."""
    towers = vision_class(_read_config(folder))
    if towers is None:
        return None
    files, _ = _weights_files(folder, trust_pickle)
    with _without_progress_bars():
        return load_text_tower(folder, towers[0], files, trust_pickle)


def folder_digest(folder: Path) -> str:
    """The content hash ``load_folder`` gives the checkpoint ``folder`` (its weights files, listed, not read)."""
    files, _ = _weights_files(folder, trust_pickle=True)
    return _folder_digest(files, folder)


def save_folder(model: Any, source: Path | None, folder: Path, digest: str | None = None) -> None:
    """Write the transformers ``model`` into the existing ``folder`` as ``load_folder`` reads it: its config and
    ``model.safetensors`` (``save_pretrained``), and the preprocessing of the folder it came from (``source``'s
    ``preprocessor_config.json``) where there was one. The vision tower of a two-tower ``source`` goes back into
    the whole model (``hf_vit_towers.save_whole``); ``source`` must still be what was loaded (``digest``)."""
    from tofu_export.atomic import usual_permissions

    towers = vision_class(_read_config(source)) if source is not None else None
    if towers and source is not None:
        files, _ = _weights_files(source, trust_pickle=True)  # read as plain weights only
        check_unchanged(source, _folder_digest(files, source), digest)  # the text tower: from the weights tuned
        save_whole(model, towers[0], source, folder, files)
        return
    with _without_progress_bars():
        model.save_pretrained(str(folder), safe_serialization=True)
    for weights in folder.glob("*.safetensors"):  # safetensors makes its files private
        usual_permissions(weights)
    if source is not None and (source / "preprocessor_config.json").is_file():
        shutil.copyfile(source / "preprocessor_config.json", folder / "preprocessor_config.json")


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """transformers' own bars (loading, writing shards) off: the commands report their steps, and a bar drawn
    between them breaks their lines."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _check_loading(folder: Path, name: str, info: dict[str, Any]) -> None:
    problems = [f"{what}: {', '.join(sorted(map(str, keys))[:5])}"
                for what, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")),
                                   ("mis-shaped", info.get("mismatched_keys"))) if keys]
    if problems:
        raise CheckpointError(f"{folder} does not fit {name}: {'; '.join(problems)}",
                              hint=Hint("arch", None, "the class the weights were saved from"))


_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes in preprocessor configs


def _preprocess(folder: Path) -> dict[str, Any]:
    """The image processor's preprocessing from ``preprocessor_config.json`` when the folder has one, in timm's
    data-config keys: ``mean`` / ``std``; ``interpolation`` (``resample``); and the resize and crop: a
    ``shortest_edge`` resize then a center crop is ``crop_pct`` = crop / edge (DINOv2, CLIP), a resize to
    ``height`` x ``width`` without a crop is timm's ``squash`` at ``crop_pct`` 1 (ViT, SigLIP)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    pairs = (("image_mean", "mean"), ("image_std", "std"))
    stated: dict[str, Any] = {ours: data[theirs] for theirs, ours in pairs if isinstance(data.get(theirs), list)}
    if data.get("resample") in _RESAMPLE:
        stated["interpolation"] = _RESAMPLE[data["resample"]]
    size, crop = data.get("size"), data.get("crop_size")
    edge = size.get("shortest_edge") if isinstance(size, dict) else size if isinstance(size, int) else None
    crop_side = crop.get("height") if isinstance(crop, dict) else crop if isinstance(crop, int) else None
    if data.get("do_center_crop") and isinstance(edge, int) and isinstance(crop_side, int) and 0 < crop_side <= edge:
        stated.update(crop_pct=crop_side / edge, crop_mode="center")
    elif not data.get("do_center_crop") and isinstance(size, dict) and {"height", "width"} <= set(size):
        stated.update(crop_pct=1.0, crop_mode="squash")
    return stated
