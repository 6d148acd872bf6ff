"""The Hugging Face transformers family: ``ViTModel`` / ``ViTForImageClassification``, ``Dinov2Model``,
``Dinov2WithRegistersModel``, ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``,
``DINOv3ViTModel`` (rotary: a kept token keeps its ``(cos, sin)``, a merged one its destination's, as in ``timm_eva``)
and ``DeiTModel`` / ``DeiTForImageClassificationWithTeacher`` (a class and a distillation token, both protected).

Each class is one ``specs.Spec`` row: where its embeddings, layers and block parts live, how many prefix tokens it
protects and how it pools. The patch (ToMe/tomesd style) swaps each layer's class for a subclass whose forward is
the two residual halves below with ToFu's ``reduce`` between them, hooks the attention's ``k_proj`` for the keys,
and (SigLIP) hooks the attention-pool head so it weighs each token by its size. transformers' own attention runs
(eager or SDPA) with the additive ``log(size)`` mask for proportional attention. Reading a ``save_pretrained`` folder
is in ``hf_vit_load.py``.

``HFVisionEncoder`` wraps a transformers model as ``pixel_values [B, 3, H, W] -> [B, K]`` (logits, image embeddings
or pooled features), which is what export, eval and profiling run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tofu_export.errors import Hint, UserError
from tofu_export.models import hf_vit_specs as specs
from tofu_export.models.family import (
    FlopCosts,
    LoadedModel,
    ModelFamily,
    TextEncoder,
    UnsupportedModelError,
    mlp_width,
)
from tofu_export.models.hf_vit_specs import SUPPORTED, HFVisionEncoder
from tofu_export.models.reduction import (
    ToFuState,
    TokenReduction,
    proportional_mask,
    size_bias,
    size_weighted_mean,
    start_forward,
)
from tofu_export.models.timm_hub import is_timm_hub_folder
from tofu_export.schedule import RSpec, TokenPlan, layer_modes, parse_r, planned_for
from tofu_export.sizes import as_pair

__all__ = ["SUPPORTED", "HFVisionEncoder", "HFVisionFamily", "wrap"]


def _tofu_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                  *args: Any, **kwargs: Any) -> Tensor:
    """The patched layer: attention half, ToFu's ``reduce``, MLP half. ``[B, N, C] -> [B, N - r, C]``.

    ``attention_mask`` is the all-visible mask transformers builds when the model is given none (``_no_user_mask``
    refuses one from the caller); the proportional-attention mask replaces it.
    """
    state: ToFuState = self._tofu
    if self.reduce.index == 0:
        start_forward(state)
    rotations = kwargs.get("position_embeddings")  # (cos, sin) [N - p, D] each (DINOv3), the same for every layer
    if rotations is not None and state.rope is not None:  # after a reduction: the kept tokens' (cos, sin)
        rotations = state.rope.chunk(2, dim=-1)
    y = specs.attention_half(self, self._tofu_spec, hidden_states, proportional_mask(state), rotations)
    table = None  # the (cos, sin) table in flight, or one made of the model's: [.., N - p, 2D]
    if rotations is not None:
        table = state.rope if state.rope is not None else torch.cat(rotations, dim=-1)
    reduced, state.size = self.reduce(y, state.size, table)  # sets state.rope [B, 1, N' - p, 2D] where it reduces
    return specs.mlp_half(self, self._tofu_spec, reduced)


_TOFU_CLASSES: dict[type, type] = {}


def _tofu_class(layer_class: type) -> type:
    """``ToFu<Layer>``: the layer's class with ``_tofu_forward`` (made once per class, as ToMe does)."""
    if layer_class not in _TOFU_CLASSES:
        _TOFU_CLASSES[layer_class] = type(f"ToFu{layer_class.__name__}", (layer_class,), {"forward": _tofu_forward})
    return _TOFU_CLASSES[layer_class]


def _no_user_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the patched model: a caller's attention mask would not survive token reduction."""
    if kwargs.get("attention_mask") is not None:
        raise ValueError("a ToFu-patched vision model takes no attention_mask")


def _pool_mask_hook(hf: nn.Module) -> Callable:
    """Forward pre-hook for SigLIP's pooling ``nn.MultiheadAttention``: each key token counts ``size`` times
    (``log(size)`` added to the pooling logits, ``[B * heads, 1, N]``)."""

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        size = specs.state_size(hf)
        if size is None:
            return args, kwargs
        tokens, heads = size.shape[1], module.num_heads
        mask = size_bias(size).expand(-1, heads, 1, tokens).reshape(-1, 1, tokens)
        return args, {**kwargs, "attn_mask": mask.to(args[0].dtype)}

    return hook


def _fix_positions(embeddings: nn.Module, img_size: tuple[int, int]) -> None:
    """The static path: DINOv2 resamples its position embeddings (bicubic, antialiased: no ONNX op) whenever it is
    traced; at a fixed input size they are a constant, computed once here (the instance attribute shadows the
    method until ``unpatch``)."""
    height, width = img_size
    patch_h, patch_w = embeddings.patch_embeddings.patch_size
    patches = (height // patch_h) * (width // patch_w)
    dim = embeddings.position_embeddings.shape[-1]
    with torch.no_grad():
        fixed = embeddings.interpolate_pos_encoding(torch.zeros(1, patches + 1, dim), height, width).detach()

    def constant(_embeddings: Tensor, _height: int, _width: int) -> Tensor:
        return fixed

    embeddings.interpolate_pos_encoding = constant


class HFVisionFamily(ModelFamily):
    """transformers vision encoders (see ``SUPPORTED``), bare or wrapped in ``HFVisionEncoder``."""

    name = "transformers"
    classes = "transformers " + " / ".join(SUPPORTED)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def recognises(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and not is_timm_hub_folder(path)  # timm's own

    def load(self, path: Path, *, arch: str | None, img_size: int | None, trust_pickle: bool,
             num_heads: int | None = None) -> LoadedModel:
        from tofu_export.models.hf_vit_load import load_folder

        loaded = load_folder(path, arch=arch, img_size=img_size, trust_pickle=trust_pickle)
        stated = loaded.arch.kwargs.get("num_attention_heads")
        if num_heads is not None and num_heads != stated:
            raise UserError(f"{path / 'config.json'} states {stated} attention heads, not {num_heads}",
                            hint=Hint("num_heads", None, "leave it out: the config states it"))
        return loaded

    def text_encoder(self, path: Path, *, arch: str | None, trust_pickle: bool) -> TextEncoder:
        from tofu_export.models.hf_vit_load import load_text

        encoder = load_text(path, trust_pickle=trust_pickle)  # None: a vision model alone
        return encoder or super().text_encoder(path, arch=arch, trust_pickle=trust_pickle)

    def digest(self, path: Path) -> str:
        from tofu_export.models.hf_vit_load import folder_digest

        return folder_digest(path)

    tuned_layout = "folder"

    def write_weights(self, model: nn.Module, loaded: LoadedModel, target: Path,
                      metadata: Mapping[str, str]) -> dict[str, Any]:
        from tofu_export.models.hf_vit_load import save_folder

        save_folder(specs.hf_of(model), loaded.path, target, loaded.sha256)
        return {}

    # -- geometry -------------------------------------------------------------------------------------------------
    def owns(self, model: nn.Module) -> bool:
        hf = specs.hf_of(model)
        return type(hf).__module__.startswith("transformers.") and type(hf).__name__ in specs.SPECS

    def depth(self, model: nn.Module) -> int:
        return len(specs.layers_of(model))

    def num_prefix(self, model: nn.Module) -> int:
        name, config = type(specs.hf_of(model)).__name__, specs.core_of(model).config
        if name.startswith("Siglip"):
            return 0
        spec = specs.spec_of(model)
        return 1 + int(spec.distilled) + (int(config.num_register_tokens) if spec.registers else 0)

    def img_size(self, model: nn.Module) -> tuple[int, int]:
        return as_pair(specs.core_of(model).config.image_size)

    def num_tokens(self, model: nn.Module, img_size: int | Sequence[int] | None = None) -> int:
        config = specs.core_of(model).config
        height, width = self.img_size(model) if img_size is None else as_pair(img_size)
        if (height, width) != self.img_size(model) and not type(specs.hf_of(model)).__name__.startswith("Dinov2"):
            raise ValueError(f"the model was built for {self.img_size(model)} inputs and takes no other size; "
                             f"rebuild it with hf_vit_resize.resized(model, {height}) or load it with img_size="
                             f"{height} (the position embeddings are resampled once).")
        return (height // config.patch_size) * (width // config.patch_size) + self.num_prefix(model)

    def embed_dim(self, model: nn.Module) -> int:
        return int(specs.core_of(model).config.hidden_size)

    def num_classes(self, model: nn.Module) -> int:
        return specs.labels_of(specs.hf_of(model))  # bare or wrapped

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return specs.layers_of(model)

    def with_blocks(self, model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        """A deep copy of ``model`` without its layers, then given ``blocks`` (hooks on the copy stay on the copy)."""
        path = f"{specs.spec_of(model).core}.{specs.spec_of(model).layers}".strip(".")
        parent_path, _, name = path.rpartition(".")
        hf = specs.hf_of(model)
        parent = specs.attr(hf, parent_path)
        own = parent._modules[name]
        parent._modules[name] = nn.ModuleList()
        try:
            skeleton = copy.deepcopy(model)
        finally:
            parent._modules[name] = own
        specs.attr(specs.hf_of(skeleton), parent_path)._modules[name] = nn.ModuleList(blocks)
        return skeleton

    def costs(self, model: nn.Module) -> FlopCosts:
        layer, dim = specs.layers_of(model)[0], self.embed_dim(model)
        hidden = mlp_width(layer.mlp, dim)
        attn = specs.attr(layer, specs.spec_of(model).attn)
        conv = next(m for m in specs.core_of(model).embeddings.modules() if isinstance(m, nn.Conv2d))
        tail = [m for name, m in specs.hf_of(model).named_modules() if isinstance(m, nn.Linear)
                and name.split(".")[0] in ("classifier", "pooler", "visual_projection", "head")]
        return FlopCosts(dim=dim, hidden=int(hidden), metric_dim=int(attn.head_dim),
                         embed_per_patch=conv.weight.numel(), head=sum(m.weight.numel() for m in tail))

    def arch_name(self, model: nn.Module) -> str:
        return type(specs.hf_of(model)).__name__

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        config = super().data_config(model)
        preprocess = getattr(model, "preprocess", {})  # the image processor's (hf_vit_load._preprocess)
        for key in ("mean", "std"):
            if key in preprocess:
                config[key] = tuple(preprocess[key])
        config.update({key: preprocess[key] for key in ("interpolation", "crop_pct", "crop_mode") if key in preprocess})
        return config

    # -- patching -------------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
              img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
              strict: bool = False, plan: TokenPlan | None = None) -> nn.Module:
        if not self.owns(model):
            raise UnsupportedModelError(f"not a supported transformers vision model: {type(model).__name__}")
        self.unpatch(model)
        hf, spec, layers = specs.hf_of(model), specs.spec_of(model), specs.layers_of(model)
        depth, prefix = len(layers), self.num_prefix(model)
        state = ToFuState(r=parse_r(r, depth), modes=layer_modes(mode, depth, prune_layers), prop_attn=prop_attn,
                          num_prefix=prefix, plan=None, img_size=None if img_size is None else as_pair(img_size))
        plan = planned_for(plan, self.num_tokens(model, img_size), prefix, state.r, strict)
        state.plan = plan if img_size is not None else None
        hooks = []
        for index, layer in enumerate(layers):
            attn = specs.attr(layer, spec.attn)
            layer.reduce = TokenReduction(state, index, heads=attn.k_proj.out_features // attn.head_dim)
            layer._tofu, layer._tofu_spec, layer._tofu_original_class = state, spec, type(layer)
            hooks.append(attn.k_proj.register_forward_hook(layer.reduce.capture_token_keys))
            layer.__class__ = _tofu_class(type(layer))
        if spec.fixed_positions and img_size is not None:
            _fix_positions(specs.core_of(model).embeddings, as_pair(img_size))
        head = getattr(hf, "head", None)
        if isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            hooks.append(head.attention.register_forward_pre_hook(_pool_mask_hook(hf), with_kwargs=True))
        hooks.append(hf.register_forward_pre_hook(_no_user_mask, with_kwargs=True))
        hf._tofu, hf._tofu_hooks = state, hooks
        return model

    def unpatch(self, model: nn.Module) -> nn.Module:
        hf = specs.hf_of(model)
        if getattr(hf, "_tofu", None) is None:
            return model
        for hook in hf._tofu_hooks:
            hook.remove()
        for layer in specs.layers_of(model):
            layer.__class__ = layer._tofu_original_class
            del layer.reduce, layer._tofu, layer._tofu_spec, layer._tofu_original_class
        del hf._tofu, hf._tofu_hooks
        specs.core_of(model).embeddings.__dict__.pop("interpolate_pos_encoding", None)
        return model

    def state(self, model: nn.Module) -> ToFuState | None:
        return getattr(specs.hf_of(model), "_tofu", None)

    # -- calibration hooks ----------------------------------------------------------------------------------------
    def embed(self, model: nn.Module, images: Tensor) -> Tensor:
        core, spec = specs.core_of(model), specs.spec_of(model)
        x = core.embeddings(images)  # [B, N, C]
        return specs.attr(core, spec.pre_norm)(x) if spec.pre_norm else x

    def attention_half(self, model: nn.Module, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        layer, spec = specs.layers_of(model)[index], specs.spec_of(model)
        attn = specs.attr(layer, spec.attn)
        probe = TokenReduction(ToFuState([0], ["mean"], False, 0, None, None), 0,
                               heads=attn.k_proj.out_features // attn.head_dim)
        hook = attn.k_proj.register_forward_hook(probe.capture_token_keys)
        try:
            y = specs.attention_half(layer, spec, x, None, self._rotations(model, x))
        finally:
            hook.remove()
        return y, probe.metric

    def mlp_half(self, model: nn.Module, index: int, y: Tensor) -> Tensor:
        return specs.mlp_half(specs.layers_of(model)[index], specs.spec_of(model), y)

    def run_blocks(self, model: nn.Module, x: Tensor, start: int) -> Tensor:
        state = self.state(model)
        if state is not None:
            start_forward(state)
        rotations = self._rotations(model, x)
        extra = {} if rotations is None else {"position_embeddings": rotations}
        for layer in specs.layers_of(model)[start:]:
            x = layer(x, None, **extra)  # no attention mask (CLIP layers require the argument)
        return x

    def block_inputs(self, model: nn.Module, tokens: int) -> dict[str, Any]:
        if not specs.spec_of(model).rotary:
            return {}
        cos, sin = self._rotation_table(model, torch.zeros(()))
        patches = tokens - self.num_prefix(model)
        return {"position_embeddings": (cos[:patches], sin[:patches])}

    def _rotations(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """A rotary model's ``(cos, sin)`` for block inputs ``x [B, N, C]`` at its own input size (every token)."""
        if not specs.spec_of(model).rotary:
            return None
        if x.shape[1] != self.num_tokens(model):
            raise ValueError(f"the calibration hooks take all {self.num_tokens(model)} tokens, got {x.shape[1]}")
        return self._rotation_table(model, x)

    def _rotation_table(self, model: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
        """A rotary model's ``(cos, sin)`` ``[N - p, D]`` for its own input size, on ``like``'s device."""
        height, width = self.img_size(model)
        return specs.core_of(model).rope_embeddings(like.new_zeros(1, 3, height, width))

    def pooled_output(self, model: nn.Module, x: Tensor) -> Tensor:
        """The model's pooled feature (pre-logits) from the last layer's tokens ``[B, N', C]``: ``[B, D]``."""
        hf, core, name = specs.hf_of(model), specs.core_of(model), type(specs.hf_of(model)).__name__
        if name.startswith("CLIP"):
            return core.post_layernorm(x[:, 0])
        if name.startswith("Siglip"):
            x = core.post_layernorm(x)
            return core.head(x) if core.use_head else size_weighted_mean(x, specs.state_size(hf))
        if name.startswith("DINOv3"):
            return core.norm(x)[:, 0]
        x = core.layernorm(x)
        pooler = getattr(core, "pooler", None)
        if pooler is not None:
            return pooler(x)
        return torch.cat([x[:, 0], x[:, 1]], dim=-1) if specs.spec_of(model).distilled else x[:, 0]  # both heads'
        # tokens (DeiT's class and distillation tokens)


def wrap(hf: nn.Module) -> HFVisionEncoder:
    """``hf`` (a supported transformers vision model) as a tensor function for export, eval and profiling."""
    if not HFVisionFamily().owns(hf) or isinstance(hf, HFVisionEncoder):
        raise UnsupportedModelError(f"not a supported transformers vision model: {type(hf).__name__}; supported: "
                                    f"{', '.join(SUPPORTED)}")
    return HFVisionEncoder(hf.eval())

