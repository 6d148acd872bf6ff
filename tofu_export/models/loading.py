"""One way in for a model: a checkpoint file (loaded safely, architecture inferred) or a timm model name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tofu_export.checkpoint import CheckpointError, load_state_dict
from tofu_export.errors import Hint
from tofu_export.hashing import sha256_file
from tofu_export.models.timm_vit_arch import ArchGuess
from tofu_export.models.timm_vit_build import build_model


@dataclass
class LoadedModel:
    """A plain (unpatched) timm model in eval mode, and where it came from."""

    model: nn.Module
    arch: ArchGuess  # the timm name and kwargs it was built with, and why
    path: Path | None  # the checkpoint file, or None for a timm name (random weights)
    sha256: str | None  # the checkpoint file's content hash

    @property
    def img_size(self) -> int:
        return int(self.model.patch_embed.img_size[0])


def load_model(
    source: str | Path,
    *,
    arch: str | None = None,
    img_size: int | None = None,
    trust_pickle: bool = False,
    allow_timm_name: bool = True,
) -> LoadedModel:
    """Load ``source``: a checkpoint file, or (``allow_timm_name``) a timm model name with random weights, which
    is fine for counting tokens and timing but not for accuracy."""
    if img_size is not None and img_size <= 0:
        raise CheckpointError(f"the input size must be a positive number of pixels, got {img_size}",
                              hint=Hint("img_size", None, "with the checkpoint's size, e.g. 224"))
    path = Path(source)
    if path.exists() or not allow_timm_name:
        state_dict = load_state_dict(path, trust_pickle=trust_pickle)  # names a missing file or a directory
        digest = sha256_file(path)
        model, guess = build_model(state_dict, arch=arch, img_size=img_size)
        return LoadedModel(model, guess, path, digest)
    import timm

    name = str(source)
    if not timm.is_model(name):
        raise CheckpointError(
            f"{name} is neither a file nor a timm model name: pass a checkpoint path, or a timm name such as "
            "deit_small_patch16_224"
        )
    kwargs = {} if img_size is None else {"img_size": img_size}
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):  # a ResNet, a ConvNeXt: no tokens
        raise CheckpointError(f"{name} is a timm {type(model).__name__}, not a Vision Transformer; tofu-export "
                              "reduces the tokens of ViTs: pass a ViT name such as deit_small_patch16_224")
    guess = ArchGuess(name=name, kwargs=kwargs, reason="timm model name (random weights)")
    return LoadedModel(model, guess, None, None)
