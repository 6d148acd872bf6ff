"""Build the timm ``Eva`` (EVA-02, DINOv3) a checkpoint's ``--arch``, config or training record names, and load its
weights into it: the named model created as timm creates it (with the record's ``model_args``), its weights checked
key by key and shape by shape against the file, and its position embedding (where it has one) resampled for another
``--img-size`` as timm's own loading resamples it. The timm family reads the file and calls ``build_eva``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint
from tofu_export.models.family import ArchGuess, fit_problems

__all__ = ["build_eva", "names_eva"]


def names_eva(name: str | None) -> bool:
    """Whether ``name`` is a timm model built by ``timm.models.eva`` (EVA-02, DINOv3, PE)."""
    if not name:
        return False
    import timm

    return timm.is_model(name) and timm.models.is_model_in_modules(name, ["eva"])


def build_eva(state_dict: Mapping[str, Tensor], name: str, *, img_size: int | None, source: str,
              preprocessing: Mapping[str, Any] | None = None, global_pool: str | None = None,
              model_args: Mapping[str, Any] | None = None, num_heads: int | None = None) -> tuple[nn.Module, ArchGuess]:
    """The timm ``Eva`` ``name`` (``source`` named it, with ``model_args``: a training record's kwargs) holding
    ``state_dict``, in eval mode; at ``img_size`` with its absolute position embedding resampled (bicubic, as timm's
    loading does; rotations follow the grid); ``global_pool`` where the source states the pooling (open_clip's
    ``timm_pool``). The head's width is the weights'; the head count the name's (a given ``num_heads`` is refused)."""
    import timm
    from timm.layers import resample_abs_pos_embed

    if num_heads is not None:
        raise CheckpointError(f"{name} is a timm Eva: its name states the head count",
                              hint=Hint("num_heads", None, "leave it out"))
    head = state_dict.get("head.weight")
    kwargs: dict[str, Any] = {**(model_args or {}), "num_classes": int(head.shape[0]) if head is not None else 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    overlay = {"pretrained_cfg_overlay": dict(preprocessing)} if preprocessing else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs, **overlay)
    except (TypeError, ValueError, AssertionError) as error:  # a kwarg the model does not take
        raise CheckpointError(f"timm could not create {name} with {kwargs} ({source} names it): "
                              f"{type(error).__name__}: {error}",
                              hint=Hint("arch", None, "naming the timm model the weights were trained as")) from error
    weights, notes = dict(state_dict), []
    pos = weights.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        weights["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                      num_prefix_tokens=prefix)
        notes.append(f"pos_embed resampled from {tuple(pos.shape)} to {tuple(model.pos_embed.shape)} (bicubic)")
    shapes = {key: tuple(tensor.shape) for key, tensor in weights.items()}
    problems = fit_problems({key: tuple(t.shape) for key, t in model.state_dict().items()}, shapes, "the model")
    if problems:
        raise CheckpointError(f"the checkpoint does not fit timm's {name} ({source} names it): {'; '.join(problems)}",
                              hint=Hint("arch", None, "naming the timm model the weights were trained as"))
    model.load_state_dict(weights, strict=True)
    provenance = {"architecture": source, "num_heads": f"{source} ({name})", "block": f"{source} ({name})",
                  "preprocessing": f"{source} pretrained_cfg" if preprocessing else f"timm's defaults for {name}"}
    reason = (f"timm Eva {name} ({source} names it): {len(model.blocks)} blocks, width {model.embed_dim}, "
              f"{model.num_prefix_tokens} prefix tokens, {'rotary' if model.rope is not None else 'no rotary'} "
              f"position embeddings, pool={model.global_pool or 'none'}")
    return model.eval(), ArchGuess(name=name, kwargs=kwargs, reason=reason, notes=tuple(notes), provenance=provenance)
