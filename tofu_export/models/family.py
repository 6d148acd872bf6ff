"""One interface for every model family ToFu can patch, load and calibrate, and the registry over them.

A family (timm ``VisionTransformer``, Hugging Face vision encoders, open_clip towers, ...) is one ``ModelFamily``
subclass in its own file under ``tofu_export/models/``, listed in ``_REGISTRY`` below. Code outside ``models/``
only ever talks to a model through ``family_of(model)`` (or the module-level helpers here), never to a family file:

    family = family_of(model)
    x = family.embed(model, images)                    # [B, N, C] tokens entering block 0
    y, metric = family.attention_half(model, 0, x)     # [B, N, C], [B, N, D]
    with patched(model, r=16, mode="tofu"):            # the caller's model is restored on exit
        out = family.pooled_output(model, family.run_blocks(model, x, 0))
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tofu_export.errors import UserError
from tofu_export.models.reduction import ToFuState
from tofu_export.models.registry import instantiate
from tofu_export.schedule import RSpec, TokenPlan

__all__ = ["ArchGuess", "FlopCosts", "LoadedModel", "ModelFamily", "TextEncoder", "ToFuState", "UnsupportedModelError",
           "families", "family_for_checkpoint", "family_of", "is_patched", "num_classes", "num_tokens", "patch",
           "patched", "tofu_state", "unpatch", "unpatched"]


class UnsupportedModelError(UserError, TypeError):
    """The model is not one whose blocks a registered family knows how to patch."""


TextEncoder = Callable[[Sequence[str]], Tensor]  # prompts [K] -> their text embeddings [K, D] (not normalised)


@dataclass(frozen=True)
class ArchGuess:
    """The architecture a model was built with, and the evidence for it.

    ``name`` is the family's class or model name (a timm name, a transformers class), ``kwargs`` what it was built
    with, ``reason`` one line of evidence, ``provenance`` where each value came from (``{"num_heads": "timm table
    vit_small_patch16_224 (embed_dim 384, depth 12, patch 16)"}``), ``notes`` anything changed on the way.
    """

    name: str
    kwargs: dict[str, Any]
    reason: str
    notes: tuple[str, ...] = ()
    provenance: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A plain (unpatched) model in eval mode, the family that owns it, and where it came from."""

    model: nn.Module
    arch: ArchGuess
    path: Path | None  # the checkpoint file or folder, or None for a model name (random weights)
    sha256: str | None  # the checkpoint's content hash

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model)

    @property
    def img_size(self) -> int:
        return int(family_of(self.model).img_size(self.model)[0])


@dataclass(frozen=True)
class FlopCosts:
    """What the GFLOPs count needs of a model, in multiply-accumulates (fvcore convention)."""

    dim: int  # C: token width
    hidden: int  # MLP hidden width
    metric_dim: int  # D: width of the matching metric (one head's keys)
    embed_per_patch: int  # MACs of the patch embedding per patch
    head: int  # MACs of the head (pooling, projection, classifier) per image


def mlp_width(mlp: nn.Module, dim: int) -> int:
    """The hidden width ``FlopCosts`` counts for ``mlp`` on ``dim``-wide tokens: its matrices' MACs per token over
    ``2 * dim`` (two matrices: their hidden width; SwiGLU's three: 1.5 times it)."""
    return sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear)) // (2 * dim)


def fit_problems(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]], built: str) -> list[str]:
    """How weights of the shapes ``found`` miss a model whose state dict has the shapes ``expected``: its mis-shaped
    keys (beside ``built``'s shape: "the config", "the model"), missing and unexpected ones, three of each named; []
    where they fit."""
    wrong = [f"{k} {list(found[k])} ({built}: {list(expected[k])})" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("mis-shaped", wrong), ("missing", missing), ("unexpected", unexpected)) if keys]


class ModelFamily(ABC):
    """How ToFu reads, builds, patches and calibrates the models of one library.

    Blocks are pre-norm: ``x -> y = x + attn(norm1(x)) -> [ToFu reduces y] -> y + mlp(norm2(y))``.
    """

    name: str = ""
    classes: str = ""  # the model classes it patches, for error messages

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def recognises(self, path: Path) -> bool:
        """Whether ``path`` (a file or a folder) is a checkpoint this family reads. Cheap: no weights loaded."""
        return False

    def names_arch(self, arch: str) -> bool:
        """Whether ``--arch arch`` names one of this family's architectures (it then reads the checkpoint)."""
        return False

    def load(self, path: Path, *, arch: str | None, img_size: int | None, trust_pickle: bool,
             num_heads: int | None = None) -> LoadedModel:
        """Build the model ``path`` describes, weights loaded, in eval mode. ``num_heads`` states the head count
        where the checkpoint cannot (a family whose checkpoints state it refuses a contradicting one)."""
        raise UserError(f"the {self.name} family does not read checkpoints ({path})")

    def digest(self, path: Path) -> str:
        """The content hash ``load`` records for the checkpoint ``path`` (``LoadedModel.sha256``), nothing loaded:
        by default the file's sha256."""
        from tofu_export.hashing import sha256_file

        return sha256_file(path)

    # how ``write_weights`` lays out new weights: "file" (a .safetensors file, its statement in a JSON beside it),
    # "folder" (a folder as ``load`` reads it, the statement inside), "" (this family does not write weights)
    tuned_layout: str = ""

    def write_weights(self, model: nn.Module, loaded: LoadedModel, target: Path,
                      metadata: Mapping[str, str]) -> dict[str, Any]:
        """Write ``model``'s weights (``loaded``'s architecture, unpatched) where ``load`` reads them back: the file
        ``target``, or into the existing empty folder ``target`` (``tuned_layout``); ``metadata`` goes into a
        safetensors header where the family writes one. Returns what a statement beside the weights must say for
        ``load`` to rebuild the model ({} where the written files say it all)."""
        raise UserError(f"the {self.name} family does not write weights back")

    def text_encoder(self, path: Path, *, arch: str | None, trust_pickle: bool) -> TextEncoder:
        """The text tower of the two-tower checkpoint ``path`` (CLIP, SigLIP) as a function of prompts, to classify
        with the image tower zero-shot; its weights read as safely as ``load`` reads the image tower's."""
        raise UserError(f"{path} is a {self.name} checkpoint without a text tower: zero-shot classification needs a "
                        "two-tower model (an open_clip checkpoint, a transformers CLIPModel or SiglipModel folder); "
                        "an image encoder alone is scored without text: by the cosine of its embeddings to the "
                        "unreduced model's, and by k-NN accuracy given train/ and test/")

    # -- geometry -------------------------------------------------------------------------------------------------
    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Whether ``model`` (patched or not) belongs to this family. Must not import optional libraries."""

    @abstractmethod
    def depth(self, model: nn.Module) -> int: ...
    @abstractmethod
    def num_prefix(self, model: nn.Module) -> int:
        """Protected tokens at the front (class, distillation, register tokens)."""

    @abstractmethod
    def img_size(self, model: nn.Module) -> tuple[int, int]:
        """The input size ``(H, W)`` the model was built for."""

    @abstractmethod
    def num_tokens(self, model: nn.Module, img_size: int | Sequence[int] | None = None) -> int:
        """Tokens entering block 0 for an input of ``img_size`` (default: the model's own)."""

    @abstractmethod
    def embed_dim(self, model: nn.Module) -> int: ...
    @abstractmethod
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's blocks, in order."""

    @abstractmethod
    def with_blocks(self, model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        """A model like ``model`` (same embedding and head) holding ``blocks`` instead of its own; patching it leaves
        ``model`` untouched. Used to export one block, or none (the stem), for latency measurements."""

    @abstractmethod
    def costs(self, model: nn.Module) -> FlopCosts: ...
    def arch_name(self, model: nn.Module) -> str:
        """A name for the architecture, recorded in policies."""
        return type(model).__name__

    def block_inputs(self, model: nn.Module, tokens: int) -> dict[str, Any]:
        """What one of ``model``'s blocks takes besides ``tokens`` tokens, as keyword arguments: a rotary model's
        rotations of ``tokens - p`` patch tokens (which ones does not change the work). Default: nothing."""
        return {}

    def num_classes(self, model: nn.Module) -> int:
        """The classes a classifier's output scores (its logits' width); 0 for a model whose output is a feature or an
        embedding. Default: timm's ``num_classes``."""
        return int(getattr(model, "num_classes", 0) or 0)

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """The eval preprocessing in timm's data-config keys (``input_size``, ``mean``, ``std``, ``interpolation``,
        ``crop_pct``); default: timm's ImageNet defaults at the model's input size."""
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        config["input_size"] = (config["input_size"][0], *self.img_size(model))
        return config

    # -- patching -------------------------------------------------------------------------------------------------
    @abstractmethod
    def patch(self, model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
              img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
              strict: bool = False, plan: TokenPlan | None = None) -> nn.Module:
        """Apply ToFu in place (see ``tofu_export.patch``); patching a patched model replaces its settings. ``plan``:
        the token plan already made for these r at ``img_size`` (``ToFuConfig.resolve``'s), used as it is."""

    @abstractmethod
    def unpatch(self, model: nn.Module) -> nn.Module:
        """Take the patch off; the weights were never touched."""

    @abstractmethod
    def state(self, model: nn.Module) -> ToFuState | None:
        """The patch's state, or None when the model is not patched."""

    # -- calibration hooks ----------------------------------------------------------------------------------------
    @abstractmethod
    def embed(self, model: nn.Module, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` -> tokens entering block 0 ``[B, N, C]``."""

    @abstractmethod
    def attention_half(self, model: nn.Module, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Block ``index``'s residual attention on an unpatched model: ``x [B, N, C]`` -> ``y [B, N, C]`` and the
        matching metric ``[B, N, D]`` (keys averaged over heads)."""

    @abstractmethod
    def mlp_half(self, model: nn.Module, index: int, y: Tensor) -> Tensor:
        """Block ``index``'s residual MLP, token by token: ``[..., C] -> [..., C]``."""

    @abstractmethod
    def run_blocks(self, model: nn.Module, x: Tensor, start: int) -> Tensor:
        """Run blocks ``start..`` of a (patched or not) model on block ``start``'s input ``x [B, N, C]``; a patched
        model's forward starts here with unit token sizes. Returns the last block's tokens ``[B, N', C]``."""

    @abstractmethod
    def pooled_output(self, model: nn.Module, x: Tensor) -> Tensor:
        """Last block's tokens ``[B, N', C]`` -> the pooled feature ``[B, D]`` (size-weighted where the head pools
        and the model is patched)."""


# Families, most specific first; the last one that recognises a file is the fallback (timm).
_REGISTRY: tuple[tuple[str, str], ...] = (
    ("tofu_export.models.hf_vit", "HFVisionFamily"),
    ("tofu_export.models.open_clip_vit", "OpenClipFamily"),
    ("tofu_export.models.timm_eva_family", "TimmEvaFamily"),
    ("tofu_export.models.timm_family", "TimmFamily"),
)
_INSTANCES: list[ModelFamily] = []


def families() -> list[ModelFamily]:
    """The registered families (instantiated once; a family whose module is missing is left out)."""
    if not _INSTANCES:
        _INSTANCES.extend(instantiate(_REGISTRY))
    return list(_INSTANCES)


def family_of(model: nn.Module) -> ModelFamily:
    """The family that owns ``model``; ``UnsupportedModelError`` when none does."""
    for family in families():
        if family.owns(model):
            return family
    names = "; ".join(f.classes for f in families())
    raise UnsupportedModelError(
        f"ToFu cannot patch a {type(model).__module__}.{type(model).__name__}: it patches vision transformers "
        f"with standard pre-norm blocks ({names})."
    )


def num_classes(model: nn.Module) -> int:
    """The classes ``model``'s output scores, as its family says (0: features or embeddings); a model no family owns
    (a denoiser step, a user's module): its own ``num_classes``, if any."""
    try:
        return family_of(model).num_classes(model)
    except UnsupportedModelError:
        return int(getattr(model, "num_classes", 0) or 0)


def family_for_checkpoint(path: Path, arch: str | None = None) -> ModelFamily:
    """The family whose architecture ``arch`` names, else the first that recognises ``path`` (a file falls back to
    timm, which reports what it cannot read)."""
    registered = families()
    named = [family for family in registered if arch and family.names_arch(arch)]
    return next(iter(named), None) or next((f for f in registered if f.recognises(path)), registered[-1])


def weights_writer(loaded: LoadedModel) -> ModelFamily:
    """The family that writes ``loaded``'s tuned weights back where it reads them: the one that read its checkpoint
    (an open_clip folder whose tower is a timm model is written back as an open_clip folder), else the model's."""
    if loaded.path is None:
        return loaded.family
    return family_for_checkpoint(Path(loaded.path), loaded.arch.name)


# -- module-level helpers: the family of the model does the work -----------------------------------------------------
def patch(model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
          img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
          strict: bool = False) -> nn.Module:
    """Apply Token Fusion to ``model`` in place and return it (see ``ModelFamily.patch``)."""
    return family_of(model).patch(model, r, mode, prop_attn, img_size, prune_layers=prune_layers, strict=strict)


def unpatch(model: nn.Module) -> nn.Module:
    return family_of(model).unpatch(model)


def tofu_state(model: nn.Module) -> ToFuState | None:
    return family_of(model).state(model)


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` carries a ToFu patch (False for a model no family owns)."""
    return any(family.owns(model) and family.state(model) is not None for family in families())


def num_tokens(model: nn.Module, img_size: int | Sequence[int] | None = None) -> int:
    return family_of(model).num_tokens(model, img_size)


def _restore(family: ModelFamily, model: nn.Module, before: ToFuState | None) -> None:
    """Put back the patch ``before`` (or none) exactly: same r, modes, proportional attention, static plan."""
    family.unpatch(model)
    if before is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said when the caller patched it
        family.patch(model, before.r, before.modes, before.prop_attn, before.img_size)
    family.state(model).plan = before.plan


@contextmanager
def patched(model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
            img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
            strict: bool = False) -> Iterator[nn.Module]:
    """Patch ``model`` for the ``with`` body; on exit the model is as the caller had it (plain, or patched with
    its own settings)."""
    family = family_of(model)
    before = family.state(model)
    family.patch(model, r, mode, prop_attn, img_size, prune_layers=prune_layers, strict=strict)
    try:
        yield model
    finally:
        _restore(family, model, before)


@contextmanager
def unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """The plain model for the ``with`` body; a patch the caller had is put back on exit."""
    family = family_of(model)
    before = family.state(model)
    family.unpatch(model)
    try:
        yield model
    finally:
        _restore(family, model, before)
