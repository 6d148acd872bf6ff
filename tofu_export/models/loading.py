"""One way in for a model: a checkpoint file or folder (loaded safely by the family that recognises it,
architecture from evidence) or a timm model name."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint
from tofu_export.models.family import LoadedModel, TextEncoder, family_for_checkpoint
from tofu_export.models.timm_vit_evidence import read_evidence
from tofu_export.models.tuned import folder_statement, tuned_note

__all__ = ["LoadedModel", "checkpoint_digest", "load_model", "stated_at_export", "text_encoder", "tuned_statement"]


def load_model(
    source: str | Path,
    *,
    arch: str | None = None,
    img_size: int | None = None,
    trust_pickle: bool = False,
    allow_timm_name: bool = True,
    num_heads: int | None = None,
) -> LoadedModel:
    """Load ``source``: a checkpoint file or ``save_pretrained`` folder, or (``allow_timm_name``) a timm model name
    with random weights, which is fine for counting tokens and timing but not for accuracy. ``num_heads`` states
    the head count where the checkpoint cannot (the summary says where every value came from). Weights
    ``finetune`` wrote carry a note of the reduction they were tuned for (``tuned_statement``)."""
    if img_size is not None and img_size <= 0:
        raise CheckpointError(f"the input size must be a positive number of pixels, got {img_size}",
                              hint=Hint("img_size", None, "with the checkpoint's size, e.g. 224"))
    path = Path(source)
    if path.exists():  # a diffusion denoiser (a family of models.denoiser_family): the `denoiser` command's
        from tofu_export.models.denoiser_family import denoiser_family_for

        denoiser = denoiser_family_for(path)
        if denoiser is not None:
            raise denoiser.main_command_error(path)
    if path.exists() or not allow_timm_name:
        family = family_for_checkpoint(path, arch)
        loaded = family.load(path, arch=arch, img_size=img_size, trust_pickle=trust_pickle, num_heads=num_heads)
        statement = tuned_statement(path) if path.exists() else {}
        if statement:  # said at every use, whatever the family: the tuning was measured with this reduction only
            loaded.arch = dataclasses.replace(loaded.arch, notes=(*loaded.arch.notes, tuned_note(path, statement)))
        return loaded
    from tofu_export.models.timm_family import TimmFamily

    return TimmFamily().load_name(str(source), img_size=img_size, num_heads=num_heads)


def stated_at_export(folder: Path) -> tuple[str | None, int | None]:
    """``(arch, num_heads)`` as the export of the artifact in ``folder`` was told them (its manifest's provenance
    says ``--arch NAME`` / ``given``), so its checkpoint is rebuilt as exported; ``(None, None)`` where it was not."""
    from tofu_export.manifest import Manifest

    manifest = Manifest.read_if_any(folder)
    if manifest is None:
        return None, None
    record = manifest.arch
    arch = record.name if str(record.provenance.get("architecture", "")).startswith("--arch") else None
    heads = record.kwargs.get("num_heads") if record.provenance.get("num_heads") == "given" else None
    return arch, heads if isinstance(heads, int) else None


def tuned_statement(path: Path) -> dict[str, Any]:
    """What ``tofu-export finetune`` stated about the checkpoint ``path`` it wrote (what it was tuned for, the
    checkpoint it was tuned from): the sidecar beside a file, read as every timm checkpoint's sidecar is, or the
    statement inside a folder; {} for any other checkpoint."""
    if path.is_dir():
        return folder_statement(path)
    return read_evidence(path).tuned if path.is_file() else {}


def checkpoint_digest(path: Path) -> str:
    """The content hash a load of the checkpoint ``path`` records (``LoadedModel.sha256``), as the family that reads
    it computes it (a file's sha256, a transformers folder's weights files', an open_clip folder's weights file's);
    nothing is loaded."""
    return family_for_checkpoint(path).digest(path)


def text_encoder(path: Path, *, arch: str | None = None, trust_pickle: bool = False) -> TextEncoder:
    """The text tower of the two-tower checkpoint ``path`` (CLIP, SigLIP: an open_clip checkpoint, a transformers
    ``CLIPModel`` / ``SiglipModel`` folder) as ``prompts [K] -> embeddings [K, D]``, read by the family that reads
    its image tower; an error naming what to do for any other checkpoint."""
    if not path.exists():  # a timm name, or a path that is not there
        raise CheckpointError(f"{path} is not a checkpoint file or folder: zero-shot classification reads the text "
                              "tower of a two-tower checkpoint (a model name has random weights and no text tower)",
                              hint=Hint("checkpoint", None, "the path of an open_clip checkpoint or a transformers "
                                        "CLIPModel / SiglipModel folder"))
    return family_for_checkpoint(path, arch).text_encoder(path, arch=arch, trust_pickle=trust_pickle)
