"""torchvision's ``VisionTransformer`` weights (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``, ``vit_h_14``)
in timm's names: the same network, so the timm family builds and patches it as the timm ViT of that shape.

torchvision's encoder block is timm's pre-norm ``Block``: ``ln_1``, ``nn.MultiheadAttention`` (a packed
``in_proj`` ``[3C, C]``, which is timm's ``qkv`` in the same q, k, v order, and ``out_proj``), ``ln_2`` and a
two-layer GELU MLP; both use LayerNorm eps 1e-6, a class token, learned position embeddings over the class token
and the patches, and a final LayerNorm. The head count is not in the weights: torchvision's models give it by
width (768: 12 heads, 1024 and 1280: 16), stated through the timm model of the same shape. Its eval transform is
torchvision's for those weights: ImageNet's mean and std, and at 224 px a bilinear resize to 256 and a center crop
(IMAGENET1K_V1), at larger sizes a bicubic resize to the size itself (the SWAG weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from tofu_export.checkpoint_limits import CheckpointError
from tofu_export.models.timm_vit_evidence import Evidence

__all__ = ["is_torchvision_vit", "torchvision_as_timm"]

_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
# (width, patch) -> the timm model of torchvision's shape, which states the head count and the block kind
_TIMM_NAMES = {(768, 16): "vit_base_patch16_224", (768, 32): "vit_base_patch32_224",
               (1024, 16): "vit_large_patch16_224", (1024, 32): "vit_large_patch32_224",
               (1280, 14): "vit_huge_patch14_224"}
_BLOCK = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)")
_IN_BLOCK = {"ln_1": "norm1", "self_attention.in_proj_": "attn.qkv.", "self_attention.out_proj": "attn.proj",
             "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.linear_1": "mlp.fc1", "mlp.3": "mlp.fc2",
             "mlp.linear_2": "mlp.fc2"}
_TOP = {"conv_proj": "patch_embed.proj", "class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
        "encoder.ln": "norm", "heads.head": "head"}


def is_torchvision_vit(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` is a torchvision ``VisionTransformer``'s (its own key names)."""
    return "conv_proj.weight" in state_dict and "encoder.pos_embedding" in state_dict and any(
        key.startswith("encoder.layers.encoder_layer_") for key in state_dict)


def _timm_key(key: str) -> str:
    block = _BLOCK.fullmatch(key)
    if block is not None:
        index, rest = block.groups()
        for theirs, ours in _IN_BLOCK.items():
            if rest.startswith(theirs):
                return f"blocks.{index}.{ours}{rest[len(theirs):]}"
        raise CheckpointError(f"torchvision ViT weight {key} has no counterpart in timm's ViT block")
    for theirs, ours in _TOP.items():
        if key == theirs or key.startswith(theirs + "."):
            return ours + key[len(theirs):]
    raise CheckpointError(f"torchvision ViT weight {key} has no counterpart in timm's ViT (a representation layer, "
                          "heads.pre_logits, is not supported)")


def torchvision_as_timm(state_dict: Mapping[str, Tensor], evidence: Evidence,
                        checkpoint: str) -> tuple[dict[str, Tensor], Evidence]:
    """``state_dict`` (torchvision's names) in timm's names, and the evidence that states its architecture: the
    timm model of its shape and torchvision's eval transform, unless ``evidence`` (a sidecar) names one already."""
    converted = {_timm_key(key): tensor for key, tensor in state_dict.items()}
    if evidence.architecture or evidence.model_args:
        return converted, evidence
    proj = converted["patch_embed.proj.weight"]  # [C, 3, P, P]
    width, patch = int(proj.shape[0]), int(proj.shape[2])
    grid = round((converted["pos_embed"].shape[1] - 1) ** 0.5)
    size = grid * patch
    transform = ({**_IMAGENET, "interpolation": "bilinear", "crop_pct": 224 / 256, "crop_mode": "center"}
                 if size == 224 else {**_IMAGENET, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"})
    return converted, Evidence(f"torchvision's VisionTransformer layout of {checkpoint} (width {width}, patch "
                               f"{patch})", _TIMM_NAMES.get((width, patch)), checkpoint=checkpoint,
                               preprocessing=transform)
