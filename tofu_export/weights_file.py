"""Weights written as a new ``.safetensors`` file (or a new checkpoint folder): never over an existing one, never
half-written.

Shared by the commands that write checkpoints (``clean-checkpoint``, ``finetune``): each writes through a hidden
temporary beside the target and moves it there without replacing anything, so a killed run leaves either nothing
or the whole file or folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from tofu_export.atomic import owner_tag, remove_stale, rename_noreplace, usual_permissions
from tofu_export.errors import UserError

if TYPE_CHECKING:
    import torch


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """``safetensors`` refuses tensors that share memory (views of one storage): those are copied, the rest not.
    The file gets the usual permissions (safetensors makes it private)."""
    from safetensors.torch import save_file


    seen: set[int] = set()
    own = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        own[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    save_file(own, str(path), metadata=dict(metadata))
    usual_permissions(path)


def write_new(path: Path, write: Callable[[Path], object], error: type[UserError], tag: str) -> None:
    """Write ``path`` through a hidden temporary beside it (``write(tmp)`` makes a file, or a folder, at ``tmp``),
    then move it there without replacing anything; ``error`` is raised if the name was taken meanwhile. ``tag``
    names the writer in the temporary."""
    remove_stale(path.parent, f".{path.name}.", ".tmp")  # left by a killed earlier run
    tmp = path.parent / f".{path.name}.{owner_tag()}-{tag}.tmp"
    try:
        write(tmp)
        rename_noreplace(tmp, path)
    except FileExistsError:
        raise error(f"{path} appeared while it was being written; nothing was replaced") from None
    finally:  # ours, and gone once moved into place
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
