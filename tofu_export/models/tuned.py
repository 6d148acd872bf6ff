"""What ``tofu-export finetune`` states about the weights it wrote, as every family reads it back.

A tuned checkpoint carries a JSON statement (what it was tuned for, the checkpoint it was tuned from), marked
``written_by: TUNED_SIDECAR``: beside a timm ``.safetensors`` file as its ``<stem>.json`` sidecar (read with the
rest of the file's evidence, ``timm_vit_evidence``), inside a transformers or open_clip folder as
``FOLDER_STATEMENT``. Every command that loads such weights says which reduction they were tuned for (``tuned_note``).
``written_as_folder`` says, before torch loads, which of the two layouts ``finetune`` writes for a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tofu_export.schedule import compact_r

TUNED_SIDECAR = "tofu-export finetune"  # the mark `finetune` writes in its statement (``written_by``)
FOLDER_STATEMENT = "tofu_finetune.json"  # the statement's name inside a folder checkpoint

__all__ = ["FOLDER_STATEMENT", "TUNED_SIDECAR", "folder_statement", "is_tuned_statement", "tuned_note",
           "written_as_folder"]


def is_tuned_statement(data: object) -> bool:
    """Whether ``data`` (a parsed JSON file) is a statement ``finetune`` wrote."""
    return isinstance(data, dict) and data.get("written_by") == TUNED_SIDECAR


def folder_statement(folder: Path) -> dict[str, Any]:
    """The statement ``finetune`` wrote inside the checkpoint folder ``folder``; {} where there is none (or it is
    not readable JSON, or another tool wrote a file of that name)."""
    try:
        data = json.loads((folder / FOLDER_STATEMENT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if is_tuned_statement(data) else {}


def tuned_note(path: Path, statement: dict[str, Any]) -> str:
    """The note for weights `tofu-export finetune` wrote (``statement``: what it stated): the reduction they were
    tuned for."""
    tuned_for = statement.get("tuned_for") if isinstance(statement.get("tuned_for"), dict) else {}
    removes = tuned_for.get("removes") or tuned_for.get("r") or []
    modes = sorted(set(tuned_for.get("modes") or []))
    return (f"{path.name} was tuned by tofu-export finetune for {tuned_for.get('source', 'a token reduction')} "
            f"(tokens removed per block {compact_r(removes)}, {'/'.join(modes) or 'modes not stated'}): export it "
            "with that reduction; with another, its fidelity was not measured")


def written_as_folder(checkpoint: Path, arch: str | None) -> bool:
    """Whether ``finetune`` writes the tuned weights of ``checkpoint`` (``--arch arch``) as a folder, decided from
    headers without torch so that a bad ``-o`` is refused before it loads: a folder checkpoint (transformers,
    open_clip) or an open_clip file is written back as a folder; a timm file (or a timm hub folder, which is its
    weights file) as a file (``ModelFamily.tuned_layout`` says the same once the model is loaded)."""
    from tofu_export.models.open_clip_config import PREFIX
    from tofu_export.models.open_clip_files import looks_like_open_clip
    from tofu_export.models.timm_hub import is_timm_hub_folder

    if bool(arch and arch.startswith(PREFIX)) or looks_like_open_clip(checkpoint):  # open_clip reads it first
        return True
    return checkpoint.is_dir() and not is_timm_hub_folder(checkpoint)  # a timm hub folder is its weights file
