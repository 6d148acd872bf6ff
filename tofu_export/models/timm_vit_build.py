"""Build the timm ``VisionTransformer`` a checkpoint describes and load its weights into it.

``build_model`` creates the model ``infer_arch`` names (``pretrained=False``), resamples ``pos_embed`` for a new
``img_size`` and loads the weights, reporting missing / unexpected / mis-shaped keys with a suggested architecture.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint
from tofu_export.models.timm_vit_arch import ArchGuess, infer_arch
from tofu_export.models.timm_vit_evidence import Evidence

__all__ = ["build_model"]

logger = logging.getLogger(__name__)
_MAX_LISTED_KEYS = 5



def build_model(
    state_dict: Mapping[str, torch.Tensor],
    *,
    arch: str | None = None,
    img_size: int | None = None,
    strict: bool = True,
    num_heads: int | None = None,
    evidence: Evidence | None = None,
    take_weights: bool = False,
) -> tuple[nn.Module, ArchGuess]:
    """Create the timm ViT for ``state_dict`` (``pretrained=False``), load the weights, return it in eval.

    Without ``arch`` the model is the inferred one with all inferred kwargs. With ``arch`` the timm defaults
    of that name are kept and only ``num_classes`` and ``img_size`` are taken from the checkpoint. An
    ``img_size`` other than the checkpoint's resamples ``pos_embed`` (bicubic, no antialias) and records a
    note. Shape mismatches always raise; missing / unexpected keys raise only when ``strict``. The returned
    :class:`ArchGuess` describes the model actually built (name, kwargs, notes, where each value came from).
    ``num_heads`` states the head count; ``evidence`` is the timm config found beside the checkpoint.
    ``take_weights``: the model may hold the tensors of ``state_dict`` themselves, not copies (the caller gives
    them up: a checkpoint just read), and is then never randomly initialised.
    """
    import timm

    if arch is not None:
        _require_known_timm_name(arch, timm)
        evidence = Evidence("the given arch", arch, built=True)
    guess = infer_arch(state_dict, num_heads=num_heads, evidence=evidence)
    target_img_size = img_size if img_size is not None else guess.kwargs["img_size"]
    patch_size = guess.kwargs["patch_size"]
    if target_img_size % patch_size:
        raise CheckpointError(
            f"img_size={target_img_size} is not a multiple of the checkpoint's patch size {patch_size}; "
            f"pick e.g. {target_img_size // patch_size * patch_size}."
        )
    if arch is None:
        name, kwargs = guess.name, {**guess.kwargs, "img_size": target_img_size}
        reason = guess.reason
    else:
        name, kwargs = arch, {"num_classes": guess.kwargs["num_classes"], "img_size": target_img_size}
        if num_heads is not None:
            kwargs["num_heads"] = num_heads
        reason = f"architecture {arch} given; the checkpoint looks like: {guess.reason}"
    stated = {} if arch is not None or evidence is None else evidence.preprocessing  # config.json's mean, std, ...
    overlay = {"pretrained_cfg_overlay": stated} if stated else {}

    def create(device: str) -> nn.Module:
        with torch.device(device):
            return timm.create_model(name, pretrained=False, **kwargs, **overlay)

    try:
        model = create("meta")  # shapes and keys only: nothing allocated, nothing initialised yet
    except Exception as err:  # timm asserts on incompatible kwarg combinations
        raise CheckpointError(
            f"timm could not create {name} with {kwargs} ({type(err).__name__}: {err}). "
            f"The checkpoint looks like: {guess.reason}."
        ) from err

    weights, notes = _fit_pos_embed(dict(state_dict), model, guess)
    notes += _check_keys_and_shapes(weights, model, guess, arch_given=arch, strict=strict)
    model = _with_weights(model, weights, lambda: create("cpu"), take=take_weights)
    for note in notes:
        logger.warning("%s", note)
    named = arch is None and evidence is not None and evidence.architecture == name
    provenance = dict(guess.provenance, architecture=f"--arch {arch}" if arch else
                      f"{evidence.source} names it; sizes from the weights" if named else "inferred from the weights")
    provenance["preprocessing"] = (f"{evidence.source} pretrained_cfg ({', '.join(stated)})" if stated
                                   else f"timm's defaults for {name}")  # an assumption where nothing named the model
    return model.eval(), ArchGuess(name=name, kwargs=kwargs, reason=reason, notes=tuple(notes), provenance=provenance)


def _with_weights(
    meta_model: nn.Module, weights: Mapping[str, torch.Tensor], create: Callable[[], nn.Module], take: bool
) -> nn.Module:
    """The model with ``weights`` loaded. With ``take``, when the weights cover every parameter and buffer, the model
    built on the meta device takes the tensors themselves (converted to its dtypes where they differ): no random
    initialisation computed only to be overwritten (ViT-L/16: 4.4-6.9 -> 0.15 CPU-s,
    ``bench/results/model_build.md``) and no second copy of the weights in memory (1.2 GB for ViT-L/16). Otherwise
    (a copy asked for, keys missing under ``strict=False``, a tensor the state dict does not hold) the model
    ``create`` builds and initialises gets a copy."""
    expected = meta_model.state_dict()
    if take and all(key in weights for key in expected) and _all_in_state_dict(meta_model, expected):
        own = {key: weights[key].to(expected[key].dtype) for key in expected}
        meta_model.load_state_dict(own, strict=False, assign=True)
        return meta_model
    model = create()
    model.load_state_dict(weights, strict=False)
    return model


def _all_in_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every parameter and buffer of ``model`` is an entry of ``state``, its state dict (none shared, none
    non-persistent), so that a complete state dict replaces all of them."""
    return len([*model.parameters(), *model.buffers()]) == len(state)


def _require_known_timm_name(arch: str, timm: Any) -> None:
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(["*vit*", "*deit*"]), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else " See timm.list_models('*vit*') for names."
    raise CheckpointError(f"Unknown timm model name {arch!r}.{hint}", hint=Hint("arch", None, "with a timm name"))


def _fit_pos_embed(
    weights: dict[str, torch.Tensor], model: nn.Module, guess: ArchGuess
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resample the checkpoint's ``pos_embed`` ``[1, T, C]`` to the model's grid if only the grid differs."""
    from timm.layers import resample_abs_pos_embed

    source = weights["pos_embed"]
    target = getattr(model, "pos_embed", None)
    if not isinstance(target, torch.Tensor) or target.shape == source.shape:
        return weights, []
    if target.shape[-1] != source.shape[-1]:
        return weights, []
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    grid = guess.kwargs["img_size"] // guess.kwargs["patch_size"]
    source_prefix = source.shape[1] - grid * grid
    if model_prefix != source_prefix:
        return weights, []  # a real architecture mismatch; reported by _check_keys_and_shapes
    new_grid = list(model.patch_embed.grid_size)
    weights["pos_embed"] = resample_abs_pos_embed(
        source, new_size=new_grid, old_size=[grid, grid], num_prefix_tokens=source_prefix, antialias=False
    )
    note = (
        f"pos_embed resampled (bicubic) from a {grid}x{grid} to a {new_grid[0]}x{new_grid[1]} patch grid for "
        f"img_size={new_grid[0] * guess.kwargs['patch_size']}; accuracy may drop without fine-tuning at "
        "this size."
    )
    return weights, [note]


def _check_keys_and_shapes(
    weights: Mapping[str, torch.Tensor], model: nn.Module, guess: ArchGuess, *, arch_given: str | None, strict: bool
) -> list[str]:
    """Raise on shape mismatches (always) and missing / unexpected keys (if ``strict``); else return notes."""
    expected = model.state_dict()
    mismatched = [k for k in expected if k in weights and expected[k].shape != weights[k].shape]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if not mismatched and (not strict or not (missing or unexpected)):
        ignored = ((missing, "missing"), (unexpected, "unexpected"))
        return [f"{len(keys)} {what} keys ignored (strict=False)" for keys, what in ignored if keys]
    problems = [
        f"{k}: model expects {_shape(expected[k])}, checkpoint has {_shape(weights[k])}" for k in mismatched
    ]
    problems += [f"{k}: missing from checkpoint (model expects {_shape(expected[k])})" for k in missing]
    problems += [f"{k}: not in the model (checkpoint has {_shape(weights[k])})" for k in unexpected]
    counts = (
        f"{len(mismatched)} shape mismatch(es), {len(missing)} missing key(s), "
        f"{len(unexpected)} unexpected key(s)"
    )
    if arch_given and guess.name != arch_given:
        hint = Hint("arch", guess.name, "or leave the architecture out to build the inferred one")
    elif arch_given:  # the named model, not this checkpoint's depth or size: build the one the weights show
        heads = guess.kwargs.get("num_heads")
        hint = Hint("num_heads", str(heads) if heads else None, "instead of --arch, to build the timm ViT the weights "
                    "show (plain pre-norm Blocks with that many heads)")
    else:
        hint = Hint("arch", None, "with the exact timm model name: the checkpoint may use blocks that a plain "
                    "VisionTransformer lacks")
    listed = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED_KEYS])
    more = f"\n  ... and {len(problems) - _MAX_LISTED_KEYS} more" if len(problems) > _MAX_LISTED_KEYS else ""
    raise CheckpointError(
        f"The checkpoint does not fit {type(model).__name__} as built ({counts}). The checkpoint looks like: "
        f"{guess.reason}.\n{listed}{more}", hint=hint,
    )


def _shape(tensor: torch.Tensor) -> str:
    return str(list(tensor.shape))
