"""The transformers vision classes ToFu supports, one ``Spec`` row each (where the embeddings, layers and block
parts live), the block as its two residual halves, and ``HFVisionEncoder``, the tensor-function wrapper."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from tofu_export.models.reduction import size_weighted_mean


@dataclass(frozen=True)
class Spec:
    core: str  # attribute path to the module holding embeddings and layers ("" = the model itself)
    layers: str  # attribute path (from core) to the ModuleList of layers
    norm1: str
    attn: str
    norm2: str
    scale1: str | None = None  # layer scale after the attention / the MLP (DINOv2)
    scale2: str | None = None
    drop: str | None = None  # residual dropout / drop path (identity in eval)
    pre_norm: str | None = None  # norm applied to the embeddings before layer 0 (CLIP)
    registers: bool = False  # prefix = class token + config.num_register_tokens
    fixed_positions: bool = False  # resamples its position embeddings whenever traced (DINOv2): fix them statically
    rotary: bool = False  # every layer takes the patch tokens' rotations, position_embeddings=(cos, sin) (DINOv3)
    distilled: bool = False  # a distillation token after the class token, read by a head of its own (DeiT)


_VIT = Spec("", "layers", "layernorm_before", "attention", "layernorm_after", drop="dropout")
_DINO = Spec("", "encoder.layer", "norm1", "attention", "norm2", "layer_scale1", "layer_scale2", "drop_path",
             fixed_positions=True)
_CLIP = Spec("", "encoder.layers", "layer_norm1", "self_attn", "layer_norm2", pre_norm="pre_layrnorm")
SPECS: dict[str, Spec] = {
    "ViTModel": _VIT,
    "ViTForImageClassification": Spec(**{**_VIT.__dict__, "core": "vit"}),
    "Dinov2Model": _DINO,
    "Dinov2WithRegistersModel": Spec(**{**_DINO.__dict__, "registers": True}),
    "CLIPVisionModel": _CLIP,
    "CLIPVisionModelWithProjection": Spec(**{**_CLIP.__dict__, "core": "vision_model"}),
    "SiglipVisionModel": Spec("", "encoder.layers", "layer_norm1", "self_attn", "layer_norm2"),
    "DINOv3ViTModel": Spec("", "model.layer", "norm1", "attention", "norm2", "layer_scale1", "layer_scale2",
                           "drop_path", registers=True, rotary=True),
    "DeiTModel": Spec(**{**_VIT.__dict__, "distilled": True}),
    "DeiTForImageClassificationWithTeacher": Spec(**{**_VIT.__dict__, "core": "deit", "distilled": True}),
}
SUPPORTED = tuple(SPECS)


def attr(module: nn.Module, path: str) -> Any:
    return operator.attrgetter(path)(module) if path else module


class HFVisionEncoder(nn.Module):
    """A transformers vision model as a tensor function: ``pixel_values [B, 3, H, W] -> [B, K]``: logits for
    ``*ForImageClassification``, image embeddings for ``*WithProjection``, else the pooled feature."""

    def __init__(self, hf: nn.Module, preprocess: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.hf = hf
        self.preprocess = dict(preprocess or {})  # timm data-config keys from preprocessor_config.json, when given

    @property
    def num_classes(self) -> int:
        """As timm models state it: the classes of the logits it outputs, 0 for features or embeddings."""
        return labels_of(self.hf)

    def forward(self, pixel_values: Tensor) -> Tensor:
        outputs = self.hf(pixel_values=pixel_values)
        if "logits" in outputs:
            return outputs["logits"]
        if "image_embeds" in outputs:
            return outputs["image_embeds"]
        if outputs.get("pooler_output") is not None:
            return outputs["pooler_output"]
        return size_weighted_mean(outputs["last_hidden_state"], state_size(self.hf))  # SigLIP without its head


def labels_of(hf: nn.Module) -> int:
    """A ``*ForImageClassification*``'s labels (its output is their logits), else 0."""
    return int(hf.config.num_labels) if "ForImageClassification" in type(hf).__name__ else 0


def hf_of(model: nn.Module) -> nn.Module:
    return model.hf if isinstance(model, HFVisionEncoder) else model


def spec_of(model: nn.Module) -> Spec:
    return SPECS[type(hf_of(model)).__name__]


def core_of(model: nn.Module) -> nn.Module:
    return attr(hf_of(model), spec_of(model).core)


def layers_of(model: nn.Module) -> nn.ModuleList:
    return attr(core_of(model), spec_of(model).layers)


def state_size(hf: nn.Module) -> Tensor | None:
    state = getattr(hf, "_tofu", None)
    return None if state is None else state.size


def attention_half(layer: nn.Module, spec: Spec, x: Tensor, mask: Tensor | None,
                   rotations: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``x [B, N, C]`` -> ``x + attn(norm1(x))`` with an additive mask ``[B, 1, 1, N]`` or None, and (rotary layers)
    the patch tokens' ``(cos, sin)``."""
    extra = {} if rotations is None else {"position_embeddings": rotations}
    out = attr(layer, spec.attn)(attr(layer, spec.norm1)(x), attention_mask=mask, **extra)[0]
    if spec.scale1:
        out = attr(layer, spec.scale1)(out)
    if spec.drop:
        out = attr(layer, spec.drop)(out)
    return x + out


def mlp_half(layer: nn.Module, spec: Spec, y: Tensor) -> Tensor:
    out = layer.mlp(attr(layer, spec.norm2)(y))
    if spec.scale2:
        out = attr(layer, spec.scale2)(out)
    if spec.drop:
        out = attr(layer, spec.drop)(out)
    return y + out
