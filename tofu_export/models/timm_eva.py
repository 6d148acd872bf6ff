"""Patch a timm ``Eva`` (EVA-02, DINOv3: rotary position embeddings) with Token Fusion, and take it off again.

As ``timm_vit`` patches ``VisionTransformer``: one ``ToFuState`` (``model._tofu``), a ``reduce`` submodule in every
block fed the keys by a hook on ``attn.k_norm`` (the keys before their rotation: what the tokens hold, not where
they are), proportional attention as an additive ``log(size)`` mask, size-weighted pooling. What the rotary
embeddings add: every patch token has its own rotation (the sin and cos of its grid position, ``[N - p, 2D]``),
which timm hands every block. A token that survives a reduction keeps its rotation and a merged token keeps its
destination's: the rotations of the kept tokens are taken with the row gather that pruning does
(``reduction.kept_rotations``) and handed on per sample, ``[B, 1, N' - p, 2D]``, the layout timm's own patch dropout
uses (``state.rope``).
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers.attention import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock
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
from tofu_export.models.timm_vit import install, is_patched, new_state, num_tokens, tofu_state, unpatch
from tofu_export.schedule import RSpec, TokenPlan

__all__ = ["is_patched", "num_tokens", "patch", "rope_of", "tofu_state", "unpatch"]


class ToFuEvaBlock(EvaBlock):
    """timm's ``EvaBlock`` with the token reduction between attention and MLP, carrying the kept rotations."""

    _tofu: ToFuState
    _tofu_original_class: type
    reduce: TokenReduction

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        state = self._tofu
        if self.reduce.index == 0:
            start_forward(state)
        if attn_mask is not None or is_causal:
            raise ValueError("ToFu-patched blocks do not take an attention mask or is_causal")
        rope = rope if state.rope is None else state.rope  # after a reduction: the kept tokens' rotations
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=proportional_mask(state))
        x = x + self.drop_path1(x_attn if self.gamma_1 is None else self.gamma_1 * x_attn)
        reduced, state.size = self.reduce(x, state.size, rope)  # sets state.rope where it removes tokens
        x_mlp = self.mlp(self.norm2(reduced))
        return reduced + self.drop_path2(x_mlp if self.gamma_2 is None else self.gamma_2 * x_mlp)


def _size_weighted_pool(self: Eva, x: Tensor, pool_type: str | None = None) -> Tensor:
    """Eva's pooling of ``x [B, N, C]``, counting each token as many times as the patches it stands for: average
    pooling (over the patch tokens) is size-weighted; an attention pool (over every token) adds ``log(size)`` to its
    logits. Token pooling takes the class token as it is."""
    size = self._tofu.size
    if size is not None and self.attn_pool is not None:
        return self.attn_pool(x, attn_mask=size_bias(size).to(x.dtype))
    if size is None or (pool_type or self.global_pool) != "avg":
        return type(self).pool(self, x, pool_type)
    p = self.num_prefix_tokens
    return size_weighted_mean(x[:, p:], size[:, p:])


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, Eva):
        raise UnsupportedModelError(f"ToFu's Eva patch takes timm Eva models (EVA-02, DINOv3); got "
                                    f"{type(model).__name__}.")
    if getattr(model, "rope_mixed", False):
        raise UnsupportedModelError("per-block (mixed) rotary embeddings are not supported: ToFu patches Eva models "
                                    "whose blocks share one rotation per token")
    for i, block in enumerate(model.blocks):
        if type(block) not in (EvaBlock, ToFuEvaBlock) or not isinstance(block.attn, (EvaAttention, AttentionRope)):
            raise UnsupportedModelError(
                f"block {i} is a {type(block).__name__} with {type(block.attn).__name__}; ToFu supports timm's "
                "pre-norm EvaBlock with EvaAttention or AttentionRope (res-post-norm blocks are not supported)")


def rope_of(model: Eva, grid: Sequence[int]) -> Tensor | None:
    """The rotations ``[N - p, 2D]`` timm's ``Eva._pos_embed`` hands the blocks for a patch grid ``(h, w)``."""
    rope = model.rope
    if rope is None:
        return None
    if model.dynamic_img_size or not hasattr(rope, "feat_shape"):
        return rope.get_embed(shape=tuple(grid))
    return rope.get_embed()


def patch(model: Eva, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
          img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None, strict: bool = False,
          plan: TokenPlan | None = None) -> Eva:
    """Apply Token Fusion to a timm ``Eva`` in place and return it; the arguments are ``timm_vit.patch``'s."""
    _check_supported(model)
    unpatch(model)
    state = new_state(model, r, mode, prop_attn, img_size, prune_layers=prune_layers, strict=strict, plan=plan)
    install(model, state, ToFuEvaBlock, _size_weighted_pool)
    return model
