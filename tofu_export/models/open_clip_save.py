"""Write a tuned open_clip visual tower back as a folder that open_clip loads whole and tofu-export reads as it read
the source.

The folder is open_clip's hub layout, which ``open_clip.create_model("local-dir:OUT")`` reads: ``open_clip_config.json``
(the source's model and preprocessing config, the text tower's included, at the image size the tower was tuned at)
and ``open_clip_model.safetensors`` holding every tensor of the source checkpoint as it was (the text tower, the
logit scale, ...; training wrappers and optimizer state left out) with the visual tower's replaced by the tuned
ones. The tuned tensors are float32 whatever the source's precision: a tuning's small steps would round away in
float16. A tower that is a timm model alone (SigLIP) goes back under ``visual.trunk.``, as open_clip names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tofu_export.checkpoint import CheckpointError, load_state_dict
from tofu_export.hashing import sha256_file
from tofu_export.models.family import LoadedModel, family_of
from tofu_export.models.open_clip_config import CONFIG_FILE, hub_config
from tofu_export.models.open_clip_files import FOLDER_WEIGHTS, VISUAL, canonical_name, is_safetensors, weights_file
from tofu_export.sizes import as_pair

__all__ = ["save_folder"]

WEIGHTS = FOLDER_WEIGHTS[0]  # open_clip_model.safetensors
_POSITIONS = {f"{VISUAL}positional_embedding", f"{VISUAL}trunk.pos_embed"}  # resampled for another input size


def _read_source(file: Path) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """Of the checkpoint ``file``, under the names open_clip's model gives them (wrappers stripped): every tensor
    outside the visual tower, as stored, and the visual tower's shapes. A safetensors file's visual tensors are not
    read; a pickle is read whole, as plain weights only (``weights_only``)."""
    if not is_safetensors(file):
        everything = {canonical_name(key): tensor for key, tensor in load_state_dict(file).items()}
        shapes = {name: tuple(tensor.shape) for name, tensor in everything.items() if name.startswith(VISUAL)}
        return {name: tensor for name, tensor in everything.items() if name not in shapes}, shapes
    from safetensors import safe_open

    rest: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        for key in handle.keys():  # noqa: SIM118 (not iterable)
            name = canonical_name(key)
            if name.startswith(VISUAL):
                shapes[name] = tuple(handle.get_slice(key).get_shape())
            else:
                rest[name] = handle.get_tensor(key)
    return rest, shapes


def _tower_tensors(tower: nn.Module, open_clip_vit: bool) -> dict[str, Tensor]:
    """The tuned tower's tensors under open_clip's names: ``visual.*``, or ``visual.trunk.*`` for a timm model."""
    prefix = VISUAL if open_clip_vit else f"{VISUAL}trunk."
    return {f"{prefix}{name}": tensor.detach().float() for name, tensor in tower.state_dict().items()}


def _check_same_tower(file: Path, shapes: dict[str, tuple[int, ...]], tuned: dict[str, Tensor], resized: bool) -> None:
    """The tuned tensors are the source's visual tensors (``shapes``), name for name and shape for shape (the
    position embeddings excepted where the tower was tuned at another size), or an error saying what differs."""
    missing, extra = sorted(set(shapes) - set(tuned)), sorted(set(tuned) - set(shapes))
    shaped = sorted(name for name in set(shapes) & set(tuned) if shapes[name] != tuple(tuned[name].shape)
                    and not (resized and name in _POSITIONS))
    problems = [f"{what}: {', '.join(names[:3])}" for what, names in
                (("not in the tuned tower", missing), ("not in the source", extra), ("shaped differently", shaped))
                if names]
    if problems:
        raise CheckpointError(f"the tuned tower does not map back onto the visual weights of {file} "
                              f"({'; '.join(problems)}), so it was not written")


def save_folder(tower: nn.Module, loaded: LoadedModel, folder: Path, metadata: dict[str, str], *,
                open_clip_vit: bool) -> None:
    """Write ``tower`` (``loaded``'s model, tuned, unpatched) with the rest of ``loaded``'s source checkpoint into
    the existing empty ``folder``: ``open_clip_model.safetensors`` (``metadata`` in its header) and
    ``open_clip_config.json``. ``open_clip_vit``: the tower is open_clip's own ViT, else a timm trunk."""
    from tofu_export.weights_file import save_safetensors

    if loaded.path is None:
        raise CheckpointError("an open_clip tower is written back beside the checkpoint it was read from; this one "
                              "names none")
    file = weights_file(Path(loaded.path))
    if loaded.sha256 and sha256_file(file) != loaded.sha256:  # the text tower must come from the weights tuned
        raise CheckpointError(f"{file} changed after it was loaded; the tuned tower was not written beside its "
                              "new contents")
    stated = hub_config(Path(loaded.path), loaded.arch.name)
    vision, size = stated["model_cfg"]["vision_cfg"], family_of(tower).img_size(tower)
    resized = as_pair(vision.get("image_size", 224)) != size
    config: dict[str, Any] = {**stated, "model_cfg": {**stated["model_cfg"], "vision_cfg": {
        **vision, "image_size": size[0] if size[0] == size[1] else list(size)}}}
    rest, shapes = _read_source(file)
    tuned = _tower_tensors(tower, open_clip_vit)
    _check_same_tower(file, shapes, tuned, resized)
    save_safetensors({**rest, **tuned}, folder / WEIGHTS, metadata)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
