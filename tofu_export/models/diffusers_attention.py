"""Dense ToFu in diffusers' feature-map ``Attention`` (``UNet2DModel``'s ``AttnDownBlock2D`` / ``AttnUpBlock2D`` /
``UNetMidBlock2D``): self-attention over the ``H x W`` positions of ``[B, C, H, W]``, with a GroupNorm in front, a
residual connection and a rescale after.

``ReducedMapProcessor`` replaces the module's attention processor. The GroupNorm needs every position, so it runs
first; the normalised tokens ``[B, N, C]`` are reduced to ``[B, N - r, C]``, attended (``to_q/k/v``, scaled dot
product, ``to_out``) and unmerged to ``[B, N, C]``; the residual and rescale follow as in diffusers'
``AttnProcessor2_0``. Only plain self-attention is reduced: a module with a spatial norm, q/k norms, a mask or a
context keeps diffusers' processor (``reducible``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tofu_export.dense.module import DenseToFu


def reducible(attn: nn.Module) -> bool:
    """Whether ``attn`` is a plain feature-map self-attention ``ReducedMapProcessor`` reproduces."""
    return (getattr(attn, "group_norm", None) is not None and getattr(attn, "spatial_norm", None) is None
            and getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
            and not getattr(attn, "is_cross_attention", False))


def _attend(attn: nn.Module, tokens: Tensor) -> Tensor:
    """Multi-head self-attention of ``tokens [B, M, C]`` -> ``[B, M, C]`` with ``attn``'s projections."""
    b = tokens.shape[0]
    heads = attn.heads
    q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)  # [B, M, H * D]
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))  # [B, H, M, D]
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # [B, H, M, D]
    out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])  # [B, M, H * D]
    return attn.to_out[1](attn.to_out[0](out))


class ReducedMapProcessor(nn.Module):
    """An attention processor for ``[B, C, H, W]`` feature maps with dense ToFu around the attention."""

    def __init__(self, tofu: DenseToFu, original) -> None:
        super().__init__()
        self.tofu = tofu
        self._original = original  # diffusers' processor, put back by ``unpatch_attention``

    def forward(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, **kwargs) -> Tensor:
        if hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            return self._original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        tokens = attn.group_norm(hidden_states.view(b, c, h * w)).transpose(1, 2)  # [B, N, C]
        out = self.tofu(tokens, lambda t: _attend(attn, t))  # [B, N, C]
        out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def map_attentions(model: nn.Module) -> dict[str, nn.Module]:
    """Every feature-map ``Attention`` of ``model`` (not inside a ``BasicTransformerBlock``) by module path."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    inside = {id(m) for block in model.modules() if isinstance(block, BasicTransformerBlock) for m in block.modules()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, Attention) and id(m) not in inside and reducible(m)}


def patch_attention(attn: nn.Module, tofu: DenseToFu) -> None:
    attn.set_processor(ReducedMapProcessor(tofu, attn.processor))


def unpatch_attention(attn: nn.Module) -> None:
    if isinstance(attn.processor, ReducedMapProcessor):
        attn.set_processor(attn.processor._original)
