"""One interface for every diffusion-denoiser family dense ToFu can load, patch, export and calibrate, and its registry.

The sibling of ``family.ModelFamily`` (ViTs: embed, attention half, pooled output...) for denoisers, whose blocks
are reduced densely (``tofu_export.dense``): a family (OpenAI / consistency UNet, diffusers denoisers) is one
``DenoiserFamily`` subclass in its own file under ``tofu_export/models/``, listed in ``_REGISTRY`` below. Code
outside ``models/`` only talks to a denoiser through this module:

    loaded = load_denoiser_source(path, config=None, trust_pickle=False, size=None)
    family, model = loaded.family, loaded.model
    make = family.make_inputs(model, loaded.size)          # (batch, seed) -> (sample, timestep[, conditioning])
    grids = family.grids(model, make(1, 0))                # block name -> token grid (height, width)
    family.patch(model, policy, grids)                     # a DensePolicy; patching first unpatches
    out = family.step(model)(*make(2, 0))                  # the exported step
    final = family.sampler(model, loaded.size, 2, seed=1)  # () -> final samples [B, C, H, W] from fixed noise
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from tofu_export.errors import Hint, UserError
from tofu_export.models.registry import instantiate

if TYPE_CHECKING:
    from tofu_export.dense.plan import DensePolicy

__all__ = ["DenoiserFamily", "Inputs", "LoadedDenoiser", "Sampler", "denoiser_families", "denoiser_family_for",
           "denoiser_family_of", "load_denoiser_source"]

Inputs = Callable[[int, int], tuple[Tensor, ...]]  # (batch, seed) -> one step's inputs
Sampler = Callable[[], Tensor]  # () -> final samples [B, C, H, W] of the model as patched now


@dataclass
class LoadedDenoiser:
    """A plain (unpatched) denoiser in eval mode, its family, where it came from and its sample side (pixels for
    an image-space model, latent side for a latent one)."""

    model: nn.Module
    family: DenoiserFamily
    path: Path
    size: int
    kind: str  # the model class, for messages and records

    def make_inputs(self) -> Inputs:
        return self.family.make_inputs(self.model, self.size)


class DenoiserFamily(ABC):
    """How dense ToFu reads, patches, exports and samples the denoisers of one library."""

    name: str = ""
    classes: str = ""  # the model classes it handles, for messages
    needs: str = ""  # what reading its checkpoints needs installed, if anything (``pip install ...``)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @abstractmethod
    def recognises(self, path: Path) -> bool:
        """Whether ``path`` (a file or folder) is this family's checkpoint. Cheap: no weights read, no optional
        library imported."""

    def describe(self, path: Path) -> str:
        """What ``path`` is, in words (``a diffusers UNet2DModel folder``), for messages."""
        return f"a {self.name} checkpoint"

    def main_command_error(self, path: Path) -> UserError:
        """The one-line error every image-encoder command (export, eval, calibrate, finetune, ...) gives for this
        family's checkpoint."""
        needs = f"; reading it needs {self.needs}" if self.needs else ""
        return UserError(f"{path} is {self.describe(path)}: a diffusion denoiser, and this command takes vision "
                         "transformers; the `denoiser` command exports it with dense ToFu (`tofu-export denoiser "
                         f"{path} -o OUT`{needs}) and `calibrate-denoiser` measures its policy")

    @abstractmethod
    def load(self, path: Path, *, config: Path | None, trust_pickle: bool, size: int | None) -> LoadedDenoiser:
        """The denoiser at ``path`` with weights loaded (eval, float32); ``config`` where the checkpoint has none
        beside it; ``size`` the sample side (default: the model's own). ``UserError`` for anything unreadable."""

    # -- model ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` (patched or not) is this family's. Must not import optional libraries."""

    @abstractmethod
    def grids(self, model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple[int, int]]:
        """Every reducible block's name -> its token grid ``(height, width)`` for ``inputs``."""

    @abstractmethod
    def patch(self, model: nn.Module, policy: DensePolicy, grids: dict[str, tuple[int, int]]) -> nn.Module:
        """Reduce the ``DensePolicy``'s blocks (removing any earlier patch first); ``UserError`` for a block the
        model does not have or a sub-layer it cannot reduce."""

    @abstractmethod
    def unpatch(self, model: nn.Module) -> nn.Module:
        """Take every reduction off; the weights were never touched."""

    @abstractmethod
    def step(self, model: nn.Module) -> nn.Module:
        """One denoiser step as a module returning a tensor: ``(sample, timestep[, conditioning]) -> output``."""

    @abstractmethod
    def input_names(self, model: nn.Module) -> list[str]:
        """The exported step's input names, in ``make_inputs``' order."""

    @abstractmethod
    def make_inputs(self, model: nn.Module, size: int) -> Inputs:
        """Seeded inputs of one step at ``size x size`` samples: ``(batch, seed) -> (sample, timestep[, cond])``."""

    # -- calibration ----------------------------------------------------------------------------------------------
    @abstractmethod
    def sampler(self, model: nn.Module, size: int, samples: int, seed: int) -> Sampler:
        """``() -> [samples, C, H, W]``: the final samples of a short deterministic sampler run from noise and
        conditioning fixed by ``seed``, with the model as patched when it is called (calibration compares a
        policy's to the unreduced model's). ``UserError`` where this family cannot sample the model."""

    def sampler_text(self, model: nn.Module) -> str:
        """The sampler in words, recorded with a calibration."""
        return "the family's sampler"


# Families, most specific first; the last is the fallback that reports what it cannot read (OpenAI UNet files).
_REGISTRY: tuple[tuple[str, str], ...] = (
    ("tofu_export.models.diffusers_family", "DiffusersFamily"),
    ("tofu_export.models.openai_unet_family", "OpenAIUNetFamily"),
)
_INSTANCES: list[DenoiserFamily] = []


def denoiser_families() -> list[DenoiserFamily]:
    """The registered denoiser families (instantiated once; a missing family module is left out)."""
    if not _INSTANCES:
        _INSTANCES.extend(instantiate(_REGISTRY))
    return list(_INSTANCES)


def denoiser_family_for(path: str | Path) -> DenoiserFamily | None:
    """The family that recognises ``path`` as its checkpoint, or None (not a denoiser any family knows)."""
    path = Path(path)
    return next((family for family in denoiser_families() if family.recognises(path)), None)


def denoiser_family_of(model: nn.Module) -> DenoiserFamily:
    """The family that owns ``model``; ``UserError`` when none does."""
    for family in denoiser_families():
        if family.owns(model):
            return family
    names = "; ".join(f.classes for f in denoiser_families())
    raise UserError(f"dense ToFu cannot reduce a {type(model).__name__}: it reduces {names}")


def load_denoiser_source(source: str | Path, *, config: str | Path | None = None, trust_pickle: bool = False,
                         size: int | None = None) -> LoadedDenoiser:
    """Load ``source`` through the family that recognises it (else the last family, which says what is missing)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist", hint=Hint("source", None, "a checkpoint folder or file"))
    if size is not None and size <= 0:
        raise UserError(f"the sample size must be a positive number, got {size}", hint=Hint("size"))
    family = denoiser_family_for(path)
    if family is None and config is None and (encoder := _image_encoder_folder(path)) is not None:
        raise UserError(f"{path} is {encoder}: an image encoder, which the main command exports with ToFu "
                        f"(tofu-export {path} --r 16); the denoiser commands take diffusion denoisers",
                        hint=Hint("source", None, "a denoiser checkpoint folder"))
    family = family or denoiser_families()[-1]
    return family.load(path, config=Path(config) if config else None, trust_pickle=trust_pickle, size=size)


def _image_encoder_folder(path: Path) -> str | None:
    """What ``path`` is, when it is a folder of an image encoder's checkpoint (a transformers ``save_pretrained``
    folder, an open_clip hub folder) rather than a denoiser's; None otherwise."""
    import json

    from tofu_export.models.open_clip_files import looks_like_open_clip
    from tofu_export.models.timm_hub import is_timm_config

    if not path.is_dir():
        return None
    if looks_like_open_clip(path):
        return "an open_clip checkpoint folder"
    try:
        stated = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if is_timm_config(stated):
        return f"a timm {stated['architecture']} folder"
    if not isinstance(stated, dict) or "_class_name" in stated:  # diffusers' configs name their class so
        return None
    named = stated.get("architectures") if isinstance(stated.get("architectures"), list) else []
    name = (named[0] if named else None) or stated.get("model_type")
    return f"a transformers {name} folder" if isinstance(name, str) else None
