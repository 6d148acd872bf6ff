"""Dense ToFu for diffusers denoisers built from ``BasicTransformerBlock``: ``UNet2DConditionModel`` (its
``Transformer2DModel`` stages), ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel``.

``patch`` swaps a chosen block's ``attn1`` (self-attention) for ``ReducedSelfAttention``, which reduces the
normalised tokens before the attention and unmerges after; ``unpatch`` puts the original module back. Only the
patch touches that state, and patching first removes an earlier patch (tomesd's ``patch.py`` rule). Token grids
are read from one dry run at the export's sample size (each ``attn1`` records its token count; grids are square).
``patch`` also swaps every ``Upsample2D`` for its static form (``diffusers_static``: exactly equal, no ``Resize``),
so that the exported step passes the TensorRT static check.
``UNet2DModel`` (attention inside ``Attention`` on feature maps, no ``BasicTransformerBlock``) is not covered.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tofu_export.dense.module import DenseToFu
from tofu_export.dense.plan import DensePolicy
from tofu_export.errors import Hint, UserError
from tofu_export.models.diffusers_static import make_static, undo_static

Inputs = Callable[[int, int], tuple[Tensor, ...]]


class ReducedSelfAttention(nn.Module):
    """``attn1`` of a ``BasicTransformerBlock`` with dense ToFu around it: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, inner: nn.Module, tofu: DenseToFu) -> None:
        super().__init__()
        self.inner, self.tofu = inner, tofu

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:  # only_cross_attention or a mask
            return self.inner(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        return self.tofu(hidden_states, lambda t: self.inner(t, **kwargs))


def _transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return {name: m for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)}


def unpatch(model: nn.Module) -> nn.Module:
    """Put back every module ``patch`` swapped (reduced self-attention, static upsamplers)."""
    undo_static(model)
    for block in _transformer_blocks(model).values():
        if isinstance(block.attn1, ReducedSelfAttention):
            block.attn1 = block.attn1.inner
    return model


def token_grids(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, tuple[int, int]]:
    """Every ``BasicTransformerBlock``'s name -> its (square) token grid, from one unreduced forward."""
    unpatch(model)
    counts: dict[str, int] = {}
    hooks = [block.attn1.register_forward_pre_hook(
        lambda _m, args, kwargs, name=name: counts.__setitem__(name, int(args[0].shape[1])), with_kwargs=True)
        for name, block in _transformer_blocks(model).items()]
    try:
        with torch.no_grad():
            step(model)(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    if not counts:
        raise UserError("this diffusers model has no BasicTransformerBlock to reduce")
    grids = {}
    for name, n in counts.items():
        side = math.isqrt(n)
        if side * side != n:
            raise UserError(f"block {name} has {n} tokens, not a square grid", hint=Hint("img_size"))
        grids[name] = (side, side)
    return grids


def patch(model: nn.Module, policy: DensePolicy, grids: dict[str, tuple[int, int]]) -> nn.Module:
    """Reduce the policy's blocks, and make the upsamplers static (``diffusers_static``) for the export."""
    unpatch(model)
    make_static(model)
    blocks = _transformer_blocks(model)
    unknown = sorted(set(policy.blocks) - set(grids))
    if unknown:
        raise UserError(f"the policy names blocks this model does not have: {', '.join(unknown)}")
    for name, plan in policy.blocks.items():
        h, w = grids[name]
        blocks[name].attn1 = ReducedSelfAttention(blocks[name].attn1,
                                                  DenseToFu(h, w, plan.ratio, plan.mode, policy.stride, policy.seed))
    return model


class _Step(nn.Module):
    """One denoiser step returning a tensor: ``(sample, timestep, conditioning) -> output``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.kind = model, type(model).__name__

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor) -> Tensor:
        if self.kind == "UNet2DConditionModel":
            return self.model(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        if self.kind == "DiTTransformer2DModel":
            return self.model(sample, timestep=timestep, class_labels=cond, return_dict=False)[0]
        if self.kind == "PixArtTransformer2DModel":
            return self.model(sample, encoder_hidden_states=cond, timestep=timestep,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        raise UserError(f"{self.kind} is not a supported diffusers denoiser")


def step(model: nn.Module) -> nn.Module:
    return model if isinstance(model, _Step) else _Step(model)


def step_inputs(model: nn.Module, size: int) -> Inputs:
    """Seeded ``(sample, timestep, conditioning)`` for ``model`` at ``size x size`` latents."""
    cfg = model.config
    kind = type(model).__name__

    def make(batch: int, seed: int) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
        t = torch.rand(batch, generator=g) * 999
        if kind == "DiTTransformer2DModel":
            return sample, t.long(), torch.randint(cfg.num_embeds_ada_norm, (batch,), generator=g)
        width = cfg.cross_attention_dim if kind == "UNet2DConditionModel" else cfg.caption_channels
        return sample, t, torch.randn(batch, 4, width, generator=g)

    return make
