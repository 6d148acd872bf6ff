"""An open_clip tower that is a timm model alone is that timm model (SigLIP, SigLIP2: ``timm_proj`` ``"none"``).

open_clip wraps such a tower as ``TimmModel(trunk=timm.create_model(timm_model_name, ...), head=<empty>)``, so its
weights ``visual.trunk.*`` are a timm state dict, and its config names the architecture (``timm_model_name``) and
the images' preprocessing (``preprocess_cfg``, or the one open_clip's pretrained tags of the config agree on). The
trunk is built as a timm checkpoint whose config names it (``timm_vit_build.build_model``: every size from the
weights, the head count from the named model, the position embeddings resampled for ``--img-size``), and is then
patched, exported and calibrated as a timm ``VisionTransformer``: a MAP head (SigLIP) weighs merged tokens by size.
An EVA-02 trunk (a timm ``Eva``) is built by its name (``timm_eva_build.build_eva``). A timm model no family
patches (parallel blocks, per-block rotations) is refused with its family's reason; a projection or attention pool
of open_clip's after the trunk is refused by ``open_clip_config``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint
from tofu_export.models.family import LoadedModel
from tofu_export.models.open_clip_config import PREFIX, TowerConfig, timm_preprocessing

__all__ = ["load_timm_trunk"]

TRUNK = "trunk."


def check_trunk_keys(file: Path, config: TowerConfig, visual: set[str]) -> None:
    """The tower's weights (``visual.`` stripped) are a timm trunk's and nothing else, or an error naming the fix."""
    outside = sorted(name for name in visual if not name.startswith(TRUNK))
    if not visual or len(outside) == len(visual):
        seen = f"open_clip's own ViT ({', '.join(outside[:2])}, ...)" if outside else "no visual tower"
        raise CheckpointError(
            f"{file} does not fit the open_clip config {config.name} from {config.source}: the config's tower is the "
            f"timm model {config.timm_trunk} (visual.trunk.* weights), the file holds {seen}",
            hint=Hint("arch", f"{PREFIX}NAME", "naming the config it was trained with"))
    if outside:
        raise CheckpointError(
            f"{file} holds visual weights outside the timm trunk ({', '.join(outside[:3])}), which the open_clip "
            f"config {config.name} does not build (timm_proj {config.vision.get('timm_proj')!r})",
            hint=Hint("arch", f"{PREFIX}NAME", "naming the config it was trained with"))


def load_timm_trunk(file: Path, path: Path, config: TowerConfig, visual: dict[str, Tensor], *,
                    img_size: int | None, num_heads: int | None, digest: str) -> LoadedModel:
    """The timm model of ``config`` holding the tower's weights ``visual`` (``visual.`` stripped; checked by
    ``check_trunk_keys``), in eval mode, with open_clip's eval transform as its preprocessing."""
    from tofu_export.models.timm_eva_build import build_eva, names_eva
    from tofu_export.models.timm_vit_build import build_model
    from tofu_export.models.timm_vit_evidence import Evidence

    name, pool = str(config.timm_trunk), config.vision.get("timm_pool", "avg")
    state = {key[len(TRUNK):]: tensor for key, tensor in visual.items()}
    visual.clear()  # the model takes the tensors themselves
    source, preprocessing = f"open_clip config {config.name}", timm_preprocessing(config.preprocess)
    if names_eva(name):  # EVA-02 towers: a timm Eva, built by its name
        model, guess = build_eva(state, name, img_size=img_size, source=source, preprocessing=preprocessing,
                                 global_pool=pool, num_heads=num_heads)
    else:
        evidence = Evidence(source, name, checkpoint=file.name, preprocessing=preprocessing)
        model, guess = build_model(state, img_size=img_size, num_heads=num_heads, evidence=evidence,
                                   take_weights=True)
    if getattr(model, "global_pool", pool) != pool:
        raise CheckpointError(f"open_clip config {config.name} pools its timm model {name} with {pool!r}; the "
                              f"weights describe {model.global_pool!r} pooling",
                              hint=Hint("arch", f"{PREFIX}NAME", "naming the config it was trained with"))
    provenance = {**guess.provenance, "architecture": f"{config.source} (timm_model_name {name})",
                  "preprocessing": f"{config.source}: open_clip's eval transform"
                                   + ("" if config.preprocess else " at open_clip's defaults")}
    guess = dataclasses.replace(guess, name=f"{PREFIX}{config.name}", provenance=provenance,
                                reason=f"open_clip visual tower from {config.source}: the timm model {name} alone "
                                       f"(text tower not loaded); {guess.reason}")
    return LoadedModel(model, guess, path, digest)
