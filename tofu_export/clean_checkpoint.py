"""A training checkpoint cleaned to what a deployment needs, as timm's ``clean_checkpoint.py`` does: the weights (the
EMA copy on request) as one ``.safetensors`` file, and beside it ``<stem>.json`` stating the architecture the
training record named. Every command then reads the result as it reads a timm hub file: the architecture from the
sidecar, the file's own sha256 as its identity (so a sweep, a calibration or an artifact's manifest never mistakes
the EMA weights for the others).

Nothing is replaced: an existing file at either path is refused, and a failed write leaves neither.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tofu_export.errors import Hint, UserError
from tofu_export.hashing import sha256_file
from tofu_export.weights_file import save_safetensors, write_new


class CleanCheckpointError(UserError):
    """The output paths are unusable (taken, or not a .safetensors name), or the checkpoint is a folder. Exit code 2."""


_FOLDER_CONFIGS = ("config.json", "open_clip_config.json")  # a transformers / diffusers or an open_clip folder's
_WEIGHT_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".safetensors", ".ckpt")


def _folder_error(folder: Path) -> CleanCheckpointError:
    """What to do with a folder: a checkpoint folder is read as it is; a folder of training checkpoints names them."""
    if any((folder / name).is_file() for name in _FOLDER_CONFIGS):
        return CleanCheckpointError(
            f"{folder} is a checkpoint folder (its config beside its weights), which every command reads as it is: "
            f"tofu-export {folder} --r 16. clean-checkpoint takes one training checkpoint file (weights with "
            "optimizer state or an EMA copy) and writes its weights as a .safetensors file",
            hint=Hint("checkpoint", None, "a training checkpoint file"))
    inside = sorted(p.name for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))[:4]
    said = f"; it holds {', '.join(inside)}" if inside else ""
    return CleanCheckpointError(f"{folder} is a folder: clean-checkpoint takes one training checkpoint file{said}",
                                hint=Hint("checkpoint", None, str(folder / inside[0]) if inside else "a file"))


@dataclass(frozen=True)
class CleanedCheckpoint:
    """What ``clean_checkpoint`` wrote."""

    weights: Path  # the .safetensors file
    sidecar: Path | None  # <stem>.json naming the architecture, or None when the checkpoint names none
    source_key: str  # the key of the weights taken where the file holds two sets ("state_dict_ema", ...), else ""
    architecture: str | None
    tensors: int
    model_args: dict = field(default_factory=dict)  # the kwargs the sidecar states beside (or without) the name


def clean_checkpoint(checkpoint: str | Path, out: str | Path, *, use_ema: bool = False, trust_pickle: bool = False,
                     step: Callable[[str], None] = lambda stage: None) -> CleanedCheckpoint:
    """Write the weights of ``checkpoint`` (its EMA copy with ``use_ema``) to ``out`` (``.safetensors``) and, where
    the file names its timm architecture, ``out.with_suffix(".json")`` stating it (``architecture``, ``model_args``).
    The output names are checked before torch is imported; ``step`` hears each stage as it begins."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".safetensors":
        raise CleanCheckpointError(f"{out}: the cleaned weights are written as .safetensors; name the file "
                                   f"{out.with_suffix('.safetensors').name}", hint=Hint("out", None, "OUT.safetensors"))
    sidecar = out.with_suffix(".json")
    taken = [str(p) for p in (out, sidecar) if os.path.lexists(p)]
    if taken:
        verb = "exists" if len(taken) == 1 else "exist"
        raise CleanCheckpointError(f"{' and '.join(taken)} already {verb}; tofu-export never replaces a file: choose "
                                   "another name or move it away", hint=Hint("out"))
    if checkpoint.is_dir():
        raise _folder_error(checkpoint)
    from tofu_export.checkpoint import read_checkpoint  # torch: only once the names are good

    step(f"reading {checkpoint.name}")
    tensors, record = read_checkpoint(checkpoint, trust_pickle=trust_pickle, use_ema=use_ema)
    step(f"writing {out.name}")
    source = {"source": checkpoint.name, "source_sha256": sha256_file(checkpoint), "weights": record.get("weights", "")}
    statement = None
    if "architecture" in record:  # a training record or a pickled timm model (its name may be None, its heads not)
        statement = {"architecture": record["architecture"], "model_args": record.get("model_args", {}), **source}
        if record.get("pretrained_cfg"):  # the preprocessing it was trained with, read back as from a hub config
            statement["pretrained_cfg"] = record["pretrained_cfg"]
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**source, "written_by": "tofu-export clean-checkpoint"}
    write_new(out, lambda tmp: save_safetensors(tensors, tmp, metadata), CleanCheckpointError, "clean")
    try:
        if statement is not None:
            write_new(sidecar, lambda tmp: tmp.write_text(json.dumps(statement, indent=2, default=str) + "\n"),
                      CleanCheckpointError, "clean")
    except BaseException:
        out.unlink(missing_ok=True)  # ours, written a moment ago: nothing half-written stays
        raise
    return CleanedCheckpoint(out, None if statement is None else sidecar, source["weights"], record.get("architecture"),
                             len(tensors), dict(record.get("model_args") or {}))
