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

from tofu_export.checkpoint import CheckpointError
from tofu_export.hashing import sha256_file
from tofu_export.models.family import LoadedModel, family_of
from tofu_export.models.open_clip_config import CONFIG_FILE, hub_config
from tofu_export.models.open_clip_files import FOLDER_WEIGHTS, VISUAL, canonical_name, weights_file
from tofu_export.models.write_back import check_maps_back, check_unchanged, read_rest
from tofu_export.sizes import as_pair

__all__ = ["save_folder"]

WEIGHTS = FOLDER_WEIGHTS[0]  # open_clip_model.safetensors
_POSITIONS = {f"{VISUAL}positional_embedding", f"{VISUAL}trunk.pos_embed"}  # resampled for another input size


def _tower_tensors(tower: nn.Module, open_clip_vit: bool) -> dict[str, Tensor]:
    """The tuned tower's tensors under open_clip's names: ``visual.*``, or ``visual.trunk.*`` for a timm model."""
    prefix = VISUAL if open_clip_vit else f"{VISUAL}trunk."
    return {f"{prefix}{name}": tensor.detach().float() for name, tensor in tower.state_dict().items()}


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
    check_unchanged(file, sha256_file(file), loaded.sha256)  # the text tower must come from the weights tuned
    stated = hub_config(Path(loaded.path), loaded.arch.name)
    vision, size = stated["model_cfg"]["vision_cfg"], family_of(tower).img_size(tower)
    resized = as_pair(vision.get("image_size", 224)) != size
    config: dict[str, Any] = {**stated, "model_cfg": {**stated["model_cfg"], "vision_cfg": {
        **vision, "image_size": size[0] if size[0] == size[1] else list(size)}}}
    rest, shapes = read_rest([file], lambda key: key.startswith(VISUAL), canonical_name)
    tuned = _tower_tensors(tower, open_clip_vit)
    check_maps_back(file, shapes, tuned, _POSITIONS if resized else ())
    save_safetensors({**rest, **tuned}, folder / WEIGHTS, metadata)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
