"""Architecture inference for timm ``VisionTransformer`` checkpoints.

* ``infer_arch`` reads the shapes of a timm ``VisionTransformer`` state dict (``patch_embed.proj.weight``
  ``[C, 3, P, P]``, ``pos_embed`` ``[1, T, C]``, ``blocks.{i}.*``, heads, layer scale, ...) and names the
  closest timm model plus the ``timm.create_model`` kwargs that make it match exactly.

``build_model`` (``timm_vit_build.py``) creates the model this names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from tofu_export.checkpoint import CheckpointError
from tofu_export.models.family import ArchGuess
from tofu_export.models.timm_vit_evidence import (
    Evidence,
    check_float_weights,
    check_sequential_blocks,
    named_timm_model,
    state_architecture,
)

__all__ = ["ArchGuess", "infer_arch"]


# ----------------------------------------------------------------------------------------------------
# Architecture inference
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KnownArch:
    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    img_size: int = 224
    num_classes: int = 1000
    distilled: bool = False
    layer_scale: bool = False


# Order breaks ties: DeiT and ViT tiny/small/base are the same network, DeiT weights are the common ones.
_KNOWN_ARCHS = (
    _KnownArch("deit_tiny_patch16_224", 16, 192, 12, 3),
    _KnownArch("deit_small_patch16_224", 16, 384, 12, 6),
    _KnownArch("deit_base_patch16_224", 16, 768, 12, 12),
    _KnownArch("deit_tiny_distilled_patch16_224", 16, 192, 12, 3, distilled=True),
    _KnownArch("deit_small_distilled_patch16_224", 16, 384, 12, 6, distilled=True),
    _KnownArch("deit_base_distilled_patch16_224", 16, 768, 12, 12, distilled=True),
    _KnownArch("vit_tiny_patch16_224", 16, 192, 12, 3),
    _KnownArch("vit_small_patch16_224", 16, 384, 12, 6),
    _KnownArch("vit_base_patch16_224", 16, 768, 12, 12),
    _KnownArch("vit_large_patch16_224", 16, 1024, 24, 16),
    _KnownArch("vit_base_patch16_224.mae", 16, 768, 12, 12, num_classes=0),
    _KnownArch("vit_small_patch14_dinov2", 14, 384, 12, 6, img_size=518, num_classes=0, layer_scale=True),
    _KnownArch("vit_base_patch14_dinov2", 14, 768, 12, 12, img_size=518, num_classes=0, layer_scale=True),
)

_LAYER_SCALE_INIT = 1e-5  # any non-None value creates the ls1/ls2 parameters; the checkpoint overwrites them


def infer_arch(
    state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None, evidence: Evidence | None = None
) -> ArchGuess:
    """Infer the timm ``VisionTransformer`` configuration of ``state_dict`` from key names and shapes.

    Reads ``patch_embed.proj.weight`` ``[C, in_chans, P, P]``, ``pos_embed`` ``[1, T, C]`` (``T`` = grid²
    plus the prefix tokens unless ``no_embed_class``), ``cls_token`` / ``dist_token`` ``[1, 1, C]``,
    ``reg_token`` ``[1, R, C]``, the ``blocks.{i}`` count, ``blocks.0.mlp.fc1.weight``
    ``[C * mlp_ratio, C]``, layer scale ``blocks.0.ls1.gamma`` ``[C]``, ``fc_norm`` / ``norm`` /
    ``norm_pre`` and ``head.weight`` ``[num_classes, C]``. ``num_heads`` and the block kind are not (always)
    visible in the weights: they must be stated (``num_heads``, ``evidence``: see ``timm_vit_evidence``), or the
    checkpoint is refused. ``provenance`` records the source of every value.
    """
    evidence = evidence or Evidence()
    check_sequential_blocks(state_dict)
    _require_vit_keys(state_dict)
    check_float_weights(state_dict)
    patch_weight = state_dict["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_h, patch_w = patch_weight.shape
    if patch_h != patch_w:
        raise CheckpointError(f"Non-square patches ({patch_h}x{patch_w}) are not supported by tofu-export.")
    patch_size = int(patch_h)
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token = "cls_token" in state_dict
    distilled = "dist_token" in state_dict
    reg_tokens = int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0
    num_prefix = int(class_token) + int(distilled) + reg_tokens
    pos_tokens = int(state_dict["pos_embed"].shape[1])
    grid, no_embed_class = _pos_embed_grid(pos_tokens, num_prefix)
    num_classes = int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0
    layer_scale = "blocks.0.ls1.gamma" in state_dict

    known = _closest_known(
        patch_size, int(embed_dim), depth, grid * patch_size, num_classes, distilled, layer_scale
    )
    shaped = known.name if (known.embed_dim, known.patch_size) == (embed_dim, patch_size) else None
    stated = state_architecture(state_dict, int(embed_dim), evidence, num_heads, suggestion=shaped)
    if not evidence.built:  # a name found beside the weights carries what they cannot show (preprocessing, ...)
        known = _named_known(evidence) or known  # (the caller's --arch is built as given, and compared with this)
    heads, heads_source = stated.num_heads, stated.heads_source
    kwargs: dict[str, Any] = {
        "embed_dim": int(embed_dim),
        "depth": depth,
        "num_heads": heads,
        "patch_size": patch_size,
        "img_size": grid * patch_size,
        "num_classes": num_classes,
        "class_token": class_token,
        "reg_tokens": reg_tokens,
        "no_embed_class": no_embed_class,
        "global_pool": _global_pool(state_dict, class_token),
        "init_values": _LAYER_SCALE_INIT if layer_scale else None,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    }
    kwargs.update(_rare_kwargs(state_dict, int(in_chans), kwargs["global_pool"], class_token))
    reason = _describe(kwargs, pos_tokens, grid, class_token, distilled, reg_tokens, known, stated.summary)
    provenance = {
        "embed_dim": "weights (patch_embed.proj.weight)", "patch_size": "weights (patch_embed.proj.weight)",
        "depth": f"weights (blocks.0-{depth - 1} keys)", "img_size": "weights (pos_embed tokens)",
        "num_classes": "weights (head.weight)" if num_classes else "weights (no head.weight)",
        "mlp_ratio": "weights (blocks.0.mlp.fc1.weight)", "num_heads": heads_source, "block": stated.block_source,
        "prefix_tokens": "weights (cls_token / dist_token / reg_token)",
    }
    return ArchGuess(name=known.name, kwargs=kwargs, reason=reason, provenance=provenance)


def _require_vit_keys(state_dict: Mapping[str, torch.Tensor]) -> None:
    required = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    if all(key in state_dict for key in required):
        shapes_ok = state_dict["patch_embed.proj.weight"].ndim == 4 and state_dict["pos_embed"].ndim == 3
        if shapes_ok:
            return
    prefixes = sorted({key.split(".", 1)[0] for key in state_dict})
    shown = ", ".join(prefixes[:10]) + (", ..." if len(prefixes) > 10 else "")
    raise CheckpointError(
        "This is not a timm VisionTransformer checkpoint: it lacks a 4-d patch_embed.proj.weight, a 3-d "
        f"pos_embed or blocks.0.mlp.fc1.weight (top-level key prefixes found: {shown}). tofu-export needs a "
        "ViT/DeiT/DINOv2 state dict with timm key names; convert weights from other libraries (e.g. Hugging "
        "Face transformers) to timm naming first."
    )


def _pos_embed_grid(pos_tokens: int, num_prefix: int) -> tuple[int, bool]:
    """Square patch grid side and ``no_embed_class`` from ``pos_embed``'s token count ``T``."""
    for candidate, no_embed_class in ((pos_tokens - num_prefix, False), (pos_tokens, True)):
        side = math.isqrt(max(candidate, 0))
        if side > 0 and side * side == candidate:
            return side, no_embed_class and num_prefix > 0
    raise CheckpointError(
        f"pos_embed has {pos_tokens} tokens, which is neither a square patch grid nor a square grid plus "
        f"the {num_prefix} prefix token(s) found in the checkpoint. tofu-export exports square inputs only; "
        "resample or fine-tune the model at a square img_size first."
    )


def _global_pool(state_dict: Mapping[str, torch.Tensor], class_token: bool) -> str:
    if "attn_pool.latent" in state_dict:
        return "map"
    if "fc_norm.weight" in state_dict or not class_token:
        return "avg"
    return "token"


def _rare_kwargs(
    state_dict: Mapping[str, torch.Tensor], in_chans: int, global_pool: str, class_token: bool
) -> dict[str, Any]:
    """Kwargs that only appear when they differ from timm's ``VisionTransformer`` defaults."""
    rare: dict[str, Any] = {}
    if in_chans != 3:
        rare["in_chans"] = in_chans
    if global_pool == "avg" and "fc_norm.weight" not in state_dict:
        rare["fc_norm"] = False
    if "norm.weight" not in state_dict and "fc_norm.weight" not in state_dict:
        rare["final_norm"] = False
    if "norm_pre.weight" in state_dict:
        rare["pre_norm"] = True
    if "blocks.0.attn.q_norm.weight" in state_dict:
        rare["qk_norm"] = True
    if "blocks.0.attn.proj.bias" not in state_dict:
        rare["proj_bias"] = False
    return rare


def _named_known(evidence: Evidence) -> _KnownArch | None:
    """The timm architecture ``evidence`` names, as a table row (``state_architecture`` has checked that it is a
    ``VisionTransformer`` of pre-norm ``Block``s as wide as the weights), or None where it names none timm has."""
    model = named_timm_model(evidence.architecture) if evidence.architecture else None
    if model is None:
        return None
    block = model.blocks[0]
    return _KnownArch(evidence.architecture, int(model.patch_embed.patch_size[0]), int(model.embed_dim),
                      len(model.blocks), int(block.attn.num_heads), img_size=int(model.patch_embed.img_size[0]),
                      num_classes=int(model.num_classes), distilled=getattr(model, "dist_token", None) is not None,
                      layer_scale=not isinstance(block.ls1, torch.nn.Identity))


def _closest_known(
    patch_size: int,
    embed_dim: int,
    depth: int,
    img_size: int,
    num_classes: int,
    distilled: bool,
    layer_scale: bool,
) -> _KnownArch:
    """The table entry with the fewest (weighted) differences; distillation must match (another class)."""

    def mismatch(known: _KnownArch) -> int:
        return (
            8 * (known.embed_dim != embed_dim)
            + 8 * (known.patch_size != patch_size)
            + 4 * (known.layer_scale != layer_scale)
            + 2 * (known.depth != depth)
            + (known.img_size != img_size)
            + ((known.num_classes == 0) != (num_classes == 0))
        )

    candidates = [known for known in _KNOWN_ARCHS if known.distilled == distilled]
    return min(candidates, key=mismatch)


def _describe(
    kwargs: Mapping[str, Any],
    pos_tokens: int,
    grid: int,
    class_token: bool,
    distilled: bool,
    reg_tokens: int,
    known: _KnownArch,
    heads_source: str,
) -> str:
    counts = ((int(class_token), "cls"), (int(distilled), "dist"), (reg_tokens, "reg"))
    prefix_parts = [f"{n} {what}" for n, what in counts if n]
    prefix = " + ".join(prefix_parts) or "no prefix tokens"
    where = "not in pos_embed" if kwargs["no_embed_class"] else "in pos_embed"
    head = f"head {kwargs['num_classes']} classes" if kwargs["num_classes"] else "no head (backbone)"
    if distilled:
        head += " + distillation head"
    overrides = [
        f"{field}={kwargs[field]}"
        for field in ("embed_dim", "patch_size", "depth", "img_size", "num_classes")
        if kwargs[field] != getattr(known, field)
    ]
    if (kwargs["init_values"] is not None) != known.layer_scale:
        overrides.append(f"init_values={kwargs['init_values']}")
    suffix = f" with {', '.join(overrides)}" if overrides else ""
    return (
        f"embed_dim={kwargs['embed_dim']}, depth={kwargs['depth']}, patch={kwargs['patch_size']}, "
        f"{pos_tokens} tokens ({grid}x{grid} grid, {prefix} {where}), {head}, pool={kwargs['global_pool']}"
        f"{', layer scale' if kwargs['init_values'] is not None else ''}, {kwargs['num_heads']} heads from "
        f"{heads_source} → {known.name}{suffix}"
    )
