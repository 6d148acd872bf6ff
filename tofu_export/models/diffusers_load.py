"""diffusers ``save_pretrained`` folders: recognise a denoiser (cheap, no diffusers import) and load it safely.

A model folder holds ``config.json`` (``_class_name``) and ``diffusion_pytorch_model.safetensors`` (or a sharded
``.safetensors.index.json``); a pipeline folder holds ``model_index.json`` and the denoiser in ``unet/`` or
``transformer/``. Weights are read from safetensors only; a folder with only pickled weights
(``diffusion_pytorch_model.bin``) needs ``trust_pickle``, and is then read with ``weights_only`` loading.
Nothing is downloaded (``local_files_only``). Without diffusers installed, the error names the extra.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from tofu_export.errors import Hint, UserError

KINDS = ("UNet2DConditionModel", "UNet2DModel", "DiTTransformer2DModel", "PixArtTransformer2DModel")
WEIGHTS = "diffusion_pytorch_model"
EXTRA = "pip install 'tofu-export[diffusers]'"


def diffusers_class(path: Path) -> str | None:
    """The ``_class_name`` of a diffusers folder (its denoiser's, for a pipeline folder); None if ``path`` is not
    one. ``""`` for a pipeline folder without a ``unet/`` or ``transformer/`` denoiser."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "model_index.json").is_file():
        folder = denoiser_folder(path)
        return (_class_name(folder) or "") if folder is not None else ""
    return _class_name(path)


def _class_name(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("_class_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def denoiser_folder(path: Path) -> Path | None:
    """``path`` itself, or for a pipeline folder its ``unet/`` or ``transformer/`` subfolder (None: neither)."""
    if not (path / "model_index.json").is_file():
        return path
    return next((path / sub for sub in ("unet", "transformer") if (path / sub / "config.json").is_file()), None)


def load_diffusers(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """The denoiser in the diffusers folder ``path``, in eval mode; ``UserError`` for anything it cannot read."""
    path = Path(path)
    kind = diffusers_class(path)
    if kind is None:
        raise UserError(f"{path} is not a diffusers folder (no config.json with _class_name)")
    try:
        import diffusers
    except ImportError:
        raise UserError(f"{path} is a diffusers folder; reading it needs the diffusers extra: {EXTRA}") from None
    if kind not in KINDS:
        raise UserError(f"{path} holds a diffusers {kind or 'pipeline without unet/ or transformer/'}; dense ToFu "
                        f"reduces {', '.join(KINDS)}")
    folder = denoiser_folder(path)
    safe = any(folder.glob(f"{WEIGHTS}*.safetensors")) or (folder / f"{WEIGHTS}.safetensors.index.json").is_file()
    if not safe:
        if not any(folder.glob(f"{WEIGHTS}*.bin")):
            raise UserError(f"{folder}: a diffusers {kind} folder without {WEIGHTS}.safetensors (nor pickled weights)")
        if not trust_pickle:
            raise UserError(f"{folder} holds pickled weights ({WEIGHTS}.bin) only; a pickle can run code when "
                            "loaded, so it is read only on request (weights_only loading)",
                            hint=Hint("trust_pickle", None, "if you trust this file, or convert it to safetensors"))
    try:
        model = getattr(diffusers, kind).from_pretrained(str(folder), use_safetensors=safe, local_files_only=True,
                                                     low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise UserError(f"cannot load the diffusers {kind} in {folder}: {type(error).__name__}: {error}") from error
    return model.eval().float()
