"""Patch a timm ``VisionTransformer`` with Token Fusion in one call, and take it off again.

All ToFu state of a model lives in one ``ToFuState`` object (``model._tofu``) shared by its blocks. Each block gets
a ``reduce`` submodule (so profilers and ONNX node names show the token reduction as ``blocks.N.reduce``) and a
forward hook on ``attn.k_norm`` (an ``Identity`` unless the model uses qk-norm) that hands the per-head keys to it;
the attention itself is timm's own forward, called with an additive ``log(size)`` mask for proportional attention,
which works with fused (SDPA) attention too.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Sequence

from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from tofu_export.models.family import UnsupportedModelError
from tofu_export.models.reduction import (
    ToFuState,
    TokenReduction,
    proportional_mask,
    size_bias,
    size_weighted_mean,
    start_forward,
)
from tofu_export.schedule import RSpec, TokenPlan, layer_modes, parse_r, planned_for
from tofu_export.sizes import as_pair

__all__ = ["ToFuState", "TokenReduction", "UnsupportedModelError", "is_patched", "num_tokens", "patch", "tofu_state",
           "unpatch"]


class ToFuBlock(Block):
    """timm's ``Block`` with the token reduction between attention and MLP (as in ToMe)."""

    _tofu: ToFuState
    _tofu_original_class: type
    reduce: TokenReduction

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        state = self._tofu
        if self.reduce.index == 0:
            start_forward(state)
        if attn_mask is not None or is_causal:
            raise ValueError("ToFu-patched blocks do not take an attention mask or is_causal")
        prop_mask = proportional_mask(state)  # [B, 1, 1, N]: proportional attention adds log(size) to the logits
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=prop_mask)))
        x, state.size = self.reduce(x, state.size)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _size_weighted_pool(self: VisionTransformer, x: Tensor, pool_type: str | None = None) -> Tensor:
    """timm's pooling of ``x [B, N, C]``, counting each token as many times as the patches it stands for: average
    pooling is size-weighted; an attention-pool head (MAP: SigLIP) adds ``log(size)`` to its attention logits,
    which is what it computes over ``size`` copies of each token. Token pooling takes the class token as it is."""
    size = self._tofu.size
    p = 0 if self.pool_include_prefix else self.num_prefix_tokens
    if size is not None and self.attn_pool is not None:
        return self.attn_pool(x[:, p:], attn_mask=size_bias(size[:, p:]).to(x.dtype))
    if size is None or (pool_type or self.global_pool) != "avg":
        return type(self).pool(self, x, pool_type)
    return size_weighted_mean(x[:, p:], size[:, p:])


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"ToFu patches timm VisionTransformer models (ViT, DeiT, DINOv2, MAE, ...); got {type(model).__name__}."
        )
    for i, block in enumerate(model.blocks):
        if type(block) not in (Block, ToFuBlock) or not isinstance(block.attn, Attention):
            raise UnsupportedModelError(
                f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}; ToFu supports timm's "
                "standard pre-norm Block with Attention (qkv projection). Parallel and res-post-norm blocks "
                "are not supported yet (rotary models are timm Eva models: EVA-02, DINOv3)."
            )
    if "attn_mask" not in inspect.signature(Attention.forward).parameters:
        raise UnsupportedModelError("this timm version's Attention takes no attn_mask; install timm>=1.0.20")


def num_tokens(model: VisionTransformer, img_size: int | Sequence[int] | None = None) -> int:
    """Tokens entering the first block for an input of ``img_size`` (default: the model's own input size)."""
    embed = model.patch_embed
    height, width = embed.img_size if img_size is None else as_pair(img_size)
    if (height, width) != tuple(embed.img_size) and embed.strict_img_size:
        raise ValueError(
            f"the model was built for {tuple(embed.img_size)} inputs and takes no other size; create it with "
            f"img_size={height} (timm resamples the position embedding) or dynamic_img_size=True."
        )
    grid = embed.dynamic_feat_size((height, width)) if hasattr(embed, "dynamic_feat_size") else embed.grid_size
    return grid[0] * grid[1] + model.num_prefix_tokens


def patch(
    model: VisionTransformer,
    r: RSpec = 16,
    mode: str | Sequence[str] = "tofu",
    prop_attn: bool = True,
    img_size: int | Sequence[int] | None = None,
    *,
    prune_layers: int | None = None,
    strict: bool = False,
    plan: TokenPlan | None = None,
) -> VisionTransformer:
    """Apply Token Fusion to a timm ``VisionTransformer`` in place and return it.

    Args:
        model: a timm VisionTransformer (class, distillation and register tokens are protected).
        r: tokens removed per block: an int, a per-block list, or ``(r, inflection)`` (see ``parse_r``).
        mode: ``"tofu"`` (MLERP; prune in the first ``prune_layers`` blocks), ``"tome"`` (average merge),
            ``"prune"``, ``"mlerp"``, or a per-block list of ``"mean" | "prune" | "mlerp"``.
        prop_attn: proportional attention (add ``log(size)`` to the attention logits).
        img_size: fix the input size and take the *static* path: token counts per block become Python constants
            and the reduction uses no scatter, ready for ONNX/TensorRT export. None: the eager path, any input size.
        prune_layers: with ``mode="tofu"``, how many leading blocks prune (default 0: measured, see
            ``schedule.DEFAULT_PRUNE_LAYERS``).
        strict: raise instead of warning when a block cannot remove the r asked of it.
        plan: the token plan already made for these r at this size (``ToFuConfig.resolve``'s), used as it is.

    Patching an already patched model replaces its settings.
    """
    _check_supported(model)
    if is_patched(model):
        unpatch(model)
    state = new_state(model, r, mode, prop_attn, img_size, prune_layers=prune_layers, strict=strict, plan=plan)
    install(model, state, ToFuBlock, _size_weighted_pool)
    return model


def new_state(model: nn.Module, r: RSpec, mode: str | Sequence[str], prop_attn: bool,
              img_size: int | Sequence[int] | None, *, prune_layers: int | None, strict: bool,
              plan: TokenPlan | None) -> ToFuState:
    """The patch's state for a timm ViT or Eva ``model`` (``patch``'s arguments); the token plan is made (static
    path) or checked at the model's own size (eager path: warns, or raises when ``strict``)."""
    depth = len(model.blocks)
    state = ToFuState(r=parse_r(r, depth), modes=layer_modes(mode, depth, prune_layers), prop_attn=prop_attn,
                      num_prefix=model.num_prefix_tokens, plan=None,
                      img_size=None if img_size is None else as_pair(img_size))
    if img_size is not None:
        state.plan = planned_for(plan, num_tokens(model, img_size), model.num_prefix_tokens, state.r, strict)
    else:
        planned_for(plan, num_tokens(model), model.num_prefix_tokens, state.r, strict)
    return state


def install(model: nn.Module, state: ToFuState, block_class: type, pool: Callable[..., Tensor]) -> None:
    """Put the patch on a timm ViT or Eva ``model``: its ``state``, its size-weighted ``pool`` and, in every block,
    a ``reduce`` fed the keys by a forward hook on ``attn.k_norm``, the block's class swapped for ``block_class``
    (``unpatch`` takes all of it off)."""
    model._tofu = state
    model.pool = types.MethodType(pool, model)
    for index, block in enumerate(model.blocks):
        block._tofu = state
        block._tofu_original_class = type(block)
        block.reduce = TokenReduction(state, index)
        block._tofu_hook = block.attn.k_norm.register_forward_hook(block.reduce.capture_keys)
        block.__class__ = block_class


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched timm ViT or Eva to plain timm (its weights were never touched)."""
    if not is_patched(model):
        return model
    for block in model.blocks:
        block._tofu_hook.remove()
        block.__class__ = block._tofu_original_class
        del block.reduce, block._tofu, block._tofu_hook, block._tofu_original_class
    del model._tofu, model.pool
    return model


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_tofu")


def tofu_state(model: nn.Module) -> ToFuState | None:
    return getattr(model, "_tofu", None)
