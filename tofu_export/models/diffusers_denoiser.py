"""diffusers denoisers as one exportable step, with dense ToFu: ``UNet2DConditionModel``, ``UNet2DModel``,
``DiTTransformer2DModel`` and ``PixArtTransformer2DModel``.

Reducible blocks are named by module path: a ``BasicTransformerBlock`` (``diffusers_blocks``) or a feature-map
``Attention`` (``diffusers_attention``). ``token_grids`` reads every block's grid from one unreduced forward (a
transformer block's token count must be a square; a feature map gives its own ``H x W``). ``patch`` reduces the
policy's blocks and swaps the upsamplers for their static form (``diffusers_static``); ``unpatch`` undoes both, and
patching first unpatches (tomesd's rule). ``step`` wraps a model as ``(sample, timestep[, conditioning]) -> output``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tofu_export.dense.module import DenseToFu
from tofu_export.dense.plan import DensePolicy
from tofu_export.errors import Hint, UserError
from tofu_export.models.diffusers_attention import map_attentions, patch_attention, unpatch_attention
from tofu_export.models.diffusers_blocks import patch_block, transformer_blocks, unpatch_block
from tofu_export.models.diffusers_load import KINDS
from tofu_export.models.diffusers_static import make_static, undo_static

Inputs = Callable[[int, int], tuple[Tensor, ...]]


def unpatch(model: nn.Module) -> nn.Module:
    """Put back every module ``patch`` swapped (reduced sub-layers and processors, static upsamplers)."""
    undo_static(model)
    for block in transformer_blocks(model).values():
        unpatch_block(block)
    for attn in map_attentions(model).values():
        unpatch_attention(attn)
    return model


def token_grids(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple[int, int]]:
    """Every reducible block's name -> its token grid ``(height, width)``, from one unreduced forward."""
    unpatch(model)
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        return lambda _m, args, kwargs: seen.__setitem__(name, tuple(args[0].shape[1:]))

    modules = {name: block.attn1 for name, block in transformer_blocks(model).items()}
    modules.update(map_attentions(model))
    hooks = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in modules.items()]
    try:
        with torch.no_grad():
            step(model)(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise UserError(f"this {type(model).__name__} has no attention block dense ToFu can reduce")
    grids = {}
    for name, shape in seen.items():
        if len(shape) == 3:  # a feature map [C, H, W]
            grids[name] = (shape[1], shape[2])
            continue
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise UserError(f"block {name} has {shape[0]} tokens, not a square grid", hint=Hint("img_size"))
        grids[name] = (side, side)
    return grids


def patch(model: nn.Module, policy: DensePolicy, grids: dict[str, tuple[int, int]]) -> nn.Module:
    """Reduce the policy's blocks before its sub-layers, and make the upsamplers static for the export."""
    unpatch(model)
    make_static(model)
    blocks, maps = transformer_blocks(model), map_attentions(model)
    unknown = sorted(set(policy.blocks) - set(grids))
    if unknown:
        raise UserError(f"the policy names blocks this model does not have: {', '.join(unknown)}")
    if maps and set(policy.sublayers) - {"self"} and set(policy.blocks) & set(maps):
        raise UserError("feature-map attention blocks have self-attention only; reduce them before 'self'",
                        hint=Hint("sublayers", "self"))
    for name, plan in policy.blocks.items():
        h, w = grids[name]
        tofu = DenseToFu(h, w, plan.ratio, plan.mode, policy.stride, policy.seed)
        if name in maps:
            patch_attention(maps[name], tofu)
        else:
            patch_block(blocks[name], tofu, policy.sublayers)
    return model


class _Step(nn.Module):
    """One denoiser step returning a tensor: ``(sample, timestep[, conditioning]) -> output``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.kind = model, type(model).__name__

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.kind == "UNet2DConditionModel":
            return self.model(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        if self.kind == "UNet2DModel":
            return self.model(sample, timestep, class_labels=cond, return_dict=False)[0]
        if self.kind == "DiTTransformer2DModel":
            return self.model(sample, timestep=timestep, class_labels=cond, return_dict=False)[0]
        if self.kind == "PixArtTransformer2DModel":
            return self.model(sample, encoder_hidden_states=cond, timestep=timestep,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        raise UserError(f"{self.kind} is not a supported diffusers denoiser (supported: {', '.join(KINDS)})")


def step(model: nn.Module) -> nn.Module:
    return model if isinstance(model, _Step) else _Step(model)


def input_names(model: nn.Module) -> list[str]:
    """The exported step's input names, in ``step_inputs``' order."""
    if type(model).__name__ == "UNet2DModel":
        return ["sample", "timestep"] + (["label"] if model.config.num_class_embeds else [])
    return ["sample", "timestep", "label" if type(model).__name__ == "DiTTransformer2DModel" else "context"]


def step_inputs(model: nn.Module, size: int, context_tokens: int = 4) -> Inputs:
    """Seeded ``(sample, timestep[, conditioning])`` for ``model`` at ``size x size`` (latent) samples."""
    cfg, kind = model.config, type(model).__name__

    def make(batch: int, seed: int) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
        t = torch.rand(batch, generator=g) * 999
        if kind == "UNet2DModel":
            labels = cfg.num_class_embeds
            return (sample, t) + ((torch.randint(labels, (batch,), generator=g),) if labels else ())
        if kind == "DiTTransformer2DModel":
            return sample, t.long(), torch.randint(cfg.num_embeds_ada_norm, (batch,), generator=g)
        width = cfg.cross_attention_dim if kind == "UNet2DConditionModel" else cfg.caption_channels
        return sample, t, torch.randn(batch, context_tokens, width, generator=g)

    return make
