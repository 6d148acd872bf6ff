"""A timm hub folder is the timm checkpoint file inside it.

``huggingface_hub.snapshot_download("timm/vit_small_patch16_224.augreg_in21k")`` gives a folder holding
``config.json`` (timm's: ``architecture``, ``num_classes``, ``pretrained_cfg``, ...) beside ``model.safetensors`` or
``pytorch_model.bin``. The timm family reads the weights file with that config as its evidence, as it reads the file
when it is passed itself. Told apart from a transformers or diffusers folder by the config alone (timm names one
``architecture``; transformers lists ``architectures`` and a ``model_type``; diffusers names a ``_class_name``).
Torch-free: the CLI and the families' recognisers ask before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from tofu_export.checkpoint_limits import CheckpointError
from tofu_export.errors import Hint

__all__ = ["HUB_WEIGHTS", "hub_weights_file", "is_timm_config", "is_timm_hub_folder"]

HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm's push_to_hub writes, preferred first


def is_timm_config(data: object) -> bool:
    """Whether ``data`` (a parsed ``config.json``) is timm's: it names one ``architecture``, and none of the keys
    transformers' and diffusers' configs hold."""
    return (isinstance(data, dict) and isinstance(data.get("architecture"), str)
            and not ({"architectures", "model_type", "_class_name"} & set(data)))


def is_timm_hub_folder(path: Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` is timm's (``is_timm_config``). Never raises."""
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8")) if path.is_dir() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return is_timm_config(data)


def hub_weights_file(folder: Path) -> Path:
    """The weights file of the timm hub folder ``folder``, or an error naming what it should hold."""
    found = next((folder / name for name in HUB_WEIGHTS if (folder / name).is_file()), None)
    if found is None:
        raise CheckpointError(f"{folder} holds timm's config.json but none of {', '.join(HUB_WEIGHTS)}",
                              hint=Hint("checkpoint", None, "the folder a timm model was downloaded or saved to"))
    return found
