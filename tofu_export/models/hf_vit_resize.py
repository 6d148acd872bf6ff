"""A transformers vision model rebuilt for another input size, its position embeddings resampled once.

transformers resamples a ViT's position embeddings on every call (``interpolate_pos_encoding=True``, or always for
DINOv2): bicubic, antialiased for DINOv2, the class token's kept. A static graph wants that done once: ``resized``
asks the model's own ``embeddings.interpolate_pos_encoding`` for the table at the new size, builds the same class
from the same config at that ``image_size`` and loads the weights with that table, so the result computes at the
new size what the original computes there with interpolation, and its config states the size it takes. A rotary
model (DINOv3) has no table: it is rebuilt at the new size with its weights as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tofu_export.checkpoint import CheckpointError
from tofu_export.checkpoint_limits import MAX_TOKENS
from tofu_export.errors import Hint
from tofu_export.models import hf_vit_specs as specs

__all__ = ["resized"]


def check_size(patch: int, native: int, img_size: int, what: str = "this model") -> None:
    """``img_size`` is a positive multiple of the ``patch`` with at most ``MAX_TOKENS`` patches (``native``: the
    model's own size, for the hint)."""
    if img_size <= 0 or img_size % patch or (img_size // patch) ** 2 > MAX_TOKENS:
        raise CheckpointError(f"an input of {img_size} px does not fit {what}: the size must be a multiple of "
                              f"its patch ({patch} px) with at most {MAX_TOKENS} patches",
                              hint=Hint("img_size", str(native), f"or another multiple of {patch}"))


def _positions(embeddings: nn.Module, img_size: int, prefix: int, dim: int, patch: int) -> torch.Tensor:
    """The model's own resampled table: ``[1, prefix + (img_size / patch)^2, C]`` (SigLIP: no class row)."""
    patches = (img_size // patch) ** 2
    with torch.no_grad():
        return embeddings.interpolate_pos_encoding(torch.zeros(1, prefix + patches, dim), img_size, img_size)


def resized(hf: nn.Module, img_size: int) -> nn.Module:
    """``hf`` (a supported transformers class, bare or wrapped, unpatched) as a model of the same class built for
    ``img_size`` inputs; ``hf`` itself when that is its size already."""
    if isinstance(hf, specs.HFVisionEncoder):
        return specs.HFVisionEncoder(resized(hf.hf, img_size), hf.preprocess)
    if getattr(hf, "_tofu", None) is not None:
        raise ValueError("resize the model before patching it")
    config = hf.config
    check_size(int(config.patch_size), int(config.image_size), img_size)
    if img_size == int(config.image_size):
        return hf
    new_config = copy.deepcopy(config)
    new_config.image_size = img_size
    if specs.SPECS[type(hf).__name__].rotary:  # no position table: the rotations follow the grid (DINOv3)
        rebuilt = type(hf)(new_config)
        rebuilt.load_state_dict(hf.state_dict(), strict=True)
        return rebuilt.eval()
    embeddings = specs.attr(hf, specs.SPECS[type(hf).__name__].core).embeddings
    spec = specs.SPECS[type(hf).__name__]  # position rows before the patches': the class (and distillation) token's
    prefix = 0 if type(hf).__name__.startswith("Siglip") else 1 + int(spec.distilled)  # (registers have none)
    table = _positions(embeddings, img_size, prefix, int(config.hidden_size), int(config.patch_size))
    rebuilt = type(hf)(new_config)
    state, shapes = hf.state_dict(), {k: v.shape for k, v in rebuilt.state_dict().items()}
    changed = [key for key, value in state.items() if key in shapes and value.shape != shapes[key]]
    if len(changed) != 1 or table.numel() != shapes[changed[0]].numel():
        raise CheckpointError(f"cannot resize {type(hf).__name__} to {img_size} px: weights {changed} change shape "
                              "(expected the position embeddings only)",
                              hint=Hint("img_size", str(config.image_size), "the size it was saved for"))
    state[changed[0]] = table.reshape(shapes[changed[0]]).to(state[changed[0]].dtype)
    rebuilt.load_state_dict(state, strict=True)
    return rebuilt.eval()
