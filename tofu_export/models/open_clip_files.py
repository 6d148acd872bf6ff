"""Which files an open_clip checkpoint is, and which of its keys are the visual tower's: read from headers only,
without torch (the CLI asks before torch loads).

A checkpoint is a file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, or a ``.pt`` from
open_clip's training: ``{"state_dict": {"module.visual.*": ...}}``) or a hub folder holding one beside its
``open_clip_config.json``.
"""

from __future__ import annotations

from pathlib import Path

from tofu_export.checkpoint_limits import CheckpointError, inspect_safetensors, inspect_torch_file, is_safetensors
from tofu_export.errors import Hint
from tofu_export.models.open_clip_config import CONFIG_FILE

__all__ = ["FOLDER_WEIGHTS", "VISUAL", "canonical_name", "header_shapes", "is_safetensors", "looks_like_open_clip",
           "text_name", "visual_name", "weights_file"]

FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                  "open_clip_pytorch_model.pth")
WRAPPERS = ("state_dict", "model", "module", "_orig_mod")  # open_clip training saves {"state_dict": {"module.*"}}
VISUAL = "visual."
TEXT = "text."  # a custom text tower's keys (SigLIP's); CLIP's own keeps its modules at the top level
_NEITHER = ("logit_scale", "logit_bias")  # the two towers' shared scale and bias


def weights_file(path: Path) -> Path:
    """The weights file of a checkpoint: ``path`` itself, or the open_clip weights in the folder ``path``."""
    if not path.is_dir():
        return path
    found = next((path / name for name in FOLDER_WEIGHTS if (path / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"{path} has an {CONFIG_FILE} but none of {', '.join(FOLDER_WEIGHTS)}",
                              hint=Hint("checkpoint", None, "naming the folder that holds the open_clip weights"))
    return found


def canonical_name(key: str) -> str:
    """``"state_dict.module.visual.conv1.weight"`` -> ``"visual.conv1.weight"``: the key as open_clip's model
    names it, training wrappers stripped."""
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in WRAPPERS:
        parts = parts[1:]
    return ".".join(parts)


def visual_name(key: str) -> str | None:
    """``"state_dict.module.visual.conv1.weight"`` -> ``"conv1.weight"``; None for a key outside the tower."""
    key = canonical_name(key)
    return key[len(VISUAL):] if key.startswith(VISUAL) else None


def text_name(key: str) -> str | None:
    """``"state_dict.module.token_embedding.weight"`` -> ``"token_embedding.weight"``, ``"text.ln_final.bias"`` ->
    ``"ln_final.bias"``; None for a key outside the text tower (the visual tower's, the logit scale and bias)."""
    key = canonical_name(key)
    if key.startswith(TEXT):
        return key[len(TEXT):]
    return None if key.startswith(VISUAL) or key in _NEITHER else key


def header_shapes(file: Path) -> dict[str, tuple[int, ...]] | None:
    """The tower's ``name -> shape`` from the file's header (no tensor read), or None where it cannot be read."""
    try:
        if is_safetensors(file):
            shapes = inspect_safetensors(file)[0]
        else:
            shapes = {name: meta.size for name, meta in inspect_torch_file(file)[0].items()}
    except (OSError, ValueError, CheckpointError, UnicodeDecodeError, EOFError):
        return None
    visual = {name: tuple(shape) for key, shape in shapes.items() if (name := visual_name(key)) is not None}
    return visual or None


def looks_like_open_clip(path: Path) -> bool:
    """A hub folder with an ``open_clip_config.json``, or a file whose keys hold an open_clip ViT tower (or a timm
    trunk, refused later with its own message). Cheap: headers only; never raises."""
    if path.is_dir():
        return (path / CONFIG_FILE).is_file()
    if not path.is_file():
        return False
    shapes = header_shapes(path) or {}
    return "conv1.weight" in shapes or any(name.startswith("trunk.") for name in shapes)
