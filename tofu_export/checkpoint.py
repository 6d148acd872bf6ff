"""Safe loading of checkpoint files: a user hands us a file, and we never trust it further than we must.

``load_state_dict`` reads ``.safetensors`` or ``torch.save`` files (``weights_only=True`` unless the caller opts
in with ``trust_pickle=True``), unwraps training wrappers (``{"model": sd}``, EMA, DDP ``module.``,
``_orig_mod.``) and turns every way a file can be broken into one :class:`CheckpointError`. ``read_checkpoint``
also returns what a training checkpoint states beside its weights (timm ``train.py``: the model name and its
``--model-kwargs``; the wrappers themselves are read by ``checkpoint_wrappers.py``). What the weights describe
(architecture inference, model building) lives beside each model family, under ``tofu_export/models/``.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tofu_export.checkpoint_limits import (
    CheckpointError,
    CheckpointLimitError,
    check_model_bounds,
    check_views,
    inspect_safetensors,
    inspect_torch_file,
)
from tofu_export.checkpoint_wrappers import WRAPPER_KEYS, ema_key, training_record, unused_ema, unwrap
from tofu_export.errors import Hint

__all__ = ["CheckpointError", "check_values", "load_state_dict", "read_checkpoint"]

logger = logging.getLogger(__name__)

_KEY_PREFIXES = ("module.", "_orig_mod.")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_LISTED_KEYS = 5
_FINITE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` state dict of a checkpoint file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path, trust_pickle=trust_pickle)[0]


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False,
                    use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint file into a flat ``{name: tensor}`` state dict on CPU, plus what the file states about
    its model beside the weights (``{}``, or ``{"architecture": name, "model_args": {...}}``: see
    :func:`training_record`; where the file also holds an EMA copy that was not used, ``"weights"`` names the key
    the weights came from and ``"unused_ema"`` the EMA copy's key). ``use_ema`` takes the EMA copy instead
    (``"weights"`` names its key; a file without one is a ``CheckpointError``), as timm's ``--use-ema`` does.

    The format is recognised from the file's first bytes (safetensors header, zip archive or legacy
    pickle), not from its suffix. Wrappers such as ``{"model": sd, "epoch": 3}`` are unwrapped (preferring
    ``model``, then ``state_dict``, then the EMA copies, as timm's ``validate.py`` without ``--use-ema``),
    non-tensor entries are dropped and ``module.`` / ``_orig_mod.`` prefixes are stripped. Pickled Python objects
    beyond tensors are refused unless ``trust_pickle=True``.
    """
    path = Path(path)
    _check_is_readable_file(path)
    kind = _sniff_format(path)
    if kind == "safetensors":
        check_model_bounds(*_safetensors_shapes(path), path)  # from the header, before any tensor is read
        raw: Any = _load_safetensors(path)
    else:
        metas, stored = inspect_torch_file(path)  # from data.pkl and the zip directory, before torch.load
        check_views(metas, path)
        check_model_bounds({name: meta.size for name, meta in metas.items()}, stored, path)
        raw = _torch_load(path, trust_pickle=trust_pickle)
    ema = ema_key(raw, path) if use_ema else None
    tensors = _strip_key_prefixes(_tensor_entries(unwrap(raw if ema is None else raw[ema]), path))
    _check_loaded_views(tensors, path)  # what the metadata reader could not see (a pickle it did not parse)
    check_model_bounds({name: tuple(t.shape) for name, t in tensors.items()}, path.stat().st_size, path)
    check_values(tensors, path)
    return tensors, {**training_record(raw), **(unused_ema(raw) if ema is None else {"weights": ema})}


def _safetensors_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    try:
        return inspect_safetensors(path)
    except (ValueError, UnicodeDecodeError) as error:  # a header that is not JSON
        raise _corrupt_file_error(path, error) from error


def _check_loaded_views(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse a loaded tensor with more elements than its storage holds (a stride-0 expansion) before anything
    reads all of its elements (a view costs nothing; ``.float()`` or a copy of it would)."""
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided:
            continue
        held = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        if tensor.numel() > held:
            raise CheckpointLimitError(
                f"{path}: tensor {name} has {tensor.numel():,} elements (shape {list(tensor.shape)}, stride "
                f"{list(tensor.stride())}) but its storage holds {held:,}: an expanded view that would take far "
                "more memory than the file. Save real weights (tensor.contiguous()) and pass that file.")


def _check_is_readable_file(path: Path) -> None:
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES)[:_MAX_LISTED_KEYS]
        hint = f" It contains {', '.join(inside)}; pass one of those." if inside else ""
        raise CheckpointError(
            f"Checkpoint path {path} is a directory, not a file. Pass the weights file itself "
            f"(a .safetensors, .pth, .pt or .bin file).{hint}"
        )
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint file {path} does not exist. Check the path (relative paths are resolved from "
            f"{Path.cwd()})."
        )
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"Checkpoint file {path} is empty (0 bytes), so it was probably not written completely. "
            "Download or save it again."
        )


def _sniff_format(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (zip or pickle), or :class:`CheckpointError` for anything else."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(_ZIP_MAGIC):
        return "torch"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode: legacy torch.save
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") + 8 <= size:
        return "safetensors"
    looks_like_text = all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head)
    what = "it looks like a text file" if looks_like_text else f"it starts with the bytes {head[:8]!r}"
    raise CheckpointError(
        f"{path} is not a PyTorch (.pth/.pt/.bin) or safetensors checkpoint: {what}. "
        "Pass the model weights saved with torch.save(model.state_dict(), ...) or safetensors' save_file."
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise _corrupt_file_error(path, err) from err


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    if trust_pickle:
        logger.warning(
            "Loading %s with trust_pickle=True (weights_only=False): Python code in the file may run.", path
        )
    try:
        # timm's training checkpoints keep their argparse.Namespace of settings: an inert bag of attributes
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        # torch words it "Unsupported global: GLOBAL x" or, for blocked modules, "unsupported GLOBAL x whose module..."
        unsafe_global = re.search(r"unsupported global(?:: GLOBAL)? ([\w.]+)", str(err), flags=re.IGNORECASE)
        if not trust_pickle and unsafe_global:
            raise CheckpointError(
                f"{path} contains Python objects beyond tensors (it references {unsafe_global.group(1)}), "
                "and loading it could execute arbitrary code, so it was not loaded. Safer: re-save it once as "
                "plain weights with torch.save(model.state_dict(), ...) or as .safetensors.",
                hint=Hint("trust_pickle", None, "only if you trust where the file came from"),
            ) from err
        raise _corrupt_file_error(path, err) from err
    except Exception as err:  # torch.load surfaces corruption as RuntimeError, EOFError, zip or import errors
        raise _corrupt_file_error(path, err) from err


def _corrupt_file_error(path: Path, err: Exception) -> CheckpointError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error:" in line), lines[0] if lines else "")
    detail = detail.split(". ")[0].rstrip(".") or "the data ends unexpectedly"
    return CheckpointError(
        f"Could not read checkpoint {path}: the file is truncated, corrupt or not a weights file "
        f"({type(err).__name__}: {detail}). Download or save it again and compare its size / SHA-256 "
        "with the source."
    )


def _tensor_entries(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of named tensors. "
            "Save the weights with torch.save(model.state_dict(), ...) and pass that file."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        found = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise CheckpointError(
            f"{path} contains no named tensors (top-level keys: {found}). Expected a state dict, possibly "
            f"under one of the keys {', '.join(WRAPPER_KEYS)}; re-save it with "
            "torch.save(model.state_dict(), ...)."
        )
    return tensors


def _value_problem(tensor: torch.Tensor) -> str | None:
    """Why a tensor cannot be real model weights (non-strided, complex, quantized, NaN/Inf), or None."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex():
        kind = "complex" if tensor.is_complex() else "quantized" if tensor.is_quantized else str(tensor.layout)
        return f"is {kind} ({tensor.dtype}), not a real-valued dense tensor"
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    finite = torch.isfinite(tensor if tensor.dtype in _FINITE_DTYPES else tensor.float())
    if bool(finite.all()):
        return None
    nan = int(torch.isnan(tensor.float()).sum())
    counts = [f"{count} {what}" for count, what in ((nan, "NaN"), (int((~finite).sum()) - nan, "infinite")) if count]
    return f"holds {' and '.join(counts)} value(s)"


def check_values(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights no model should have (NaN / Inf, complex or quantized values), naming the tensors."""
    problems = [f"{name} {problem}" for name, tensor in tensors.items() if (problem := _value_problem(tensor))]
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED_KEYS} more tensors)" if len(problems) > _MAX_LISTED_KEYS else ""
        raise CheckpointError(
            f"{path} holds weights that cannot be exported: {'; '.join(problems[:_MAX_LISTED_KEYS])}{more}. The "
            "file is corrupt, or was saved from a diverged or quantized run: use a clean float checkpoint (an "
            "earlier epoch, or the original download)."
        )


def _strip_key_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP ``module.`` and ``torch.compile`` ``_orig_mod.`` prefixes (in any nesting order)."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped
