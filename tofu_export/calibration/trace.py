"""One pass of the unreduced model over the calibration images, keeping what every per-block measurement needs.

The pass runs each timm block as its two residual halves (attention, then MLP) so that the post-attention tokens
and the attention keys can be read where ToFu would reduce, without patching the model:

    x_i [B, N, C]  --attention half-->  y_i [B, N, C]  --MLP half-->  x_{i+1} [B, N, C]

It keeps every block's input ``x_i`` (so a later measurement that reduces in block ``i`` alone runs only blocks
``i..depth-1``), the linearity of every block on the pairs its matching would reduce, and the unreduced pooled
output, the reference every cosine is taken against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from tofu_export.calibration.linearity import linearity_ratio, matched_pairs
from tofu_export.merge import bipartite_soft_matching, max_reduction


@dataclass
class Trace:
    """The unreduced model's view of the calibration images."""

    inputs: list[Tensor]  # [depth] x [B, N, C]: input of block i
    reference: Tensor  # [B, D] pooled output (pre-logits) of the unreduced model
    linearity: list[Tensor]  # [depth] x [B, r_i]: the criterion on each block's matched pairs


def embed(model: VisionTransformer, images: Tensor) -> Tensor:
    """``images [B, 3, H, W]`` -> tokens entering block 0, ``[B, N, C]`` (timm's ``forward_features`` before its
    blocks)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def pooled_output(model: VisionTransformer, x: Tensor) -> Tensor:
    """Tokens after the last block ``[B, N', C]`` -> the pooled feature ``[B, D]`` (pre-logits, so a classifier is
    compared on its features too)."""
    return model.forward_head(model.norm(x), pre_logits=True)


def attention_half(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [B, N, C]`` -> post-attention tokens ``y [B, N, C]`` and the matching metric ``[B, N, D]`` (the keys
    averaged over heads, as ``TokenReduction`` takes them)."""
    captured: list[Tensor] = []
    hook = block.attn.k_norm.register_forward_hook(lambda _m, _a, keys: captured.append(keys.mean(dim=1)))
    try:
        y = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    finally:
        hook.remove()
    return y, captured[0]


def mlp_half(block: Block, y: Tensor) -> Tensor:
    """The block's MLP residual, token by token: ``[..., C] -> [..., C]`` (the ``f`` of the linearity criterion)."""
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def trace(model: VisionTransformer, images: Tensor, r: int, *, batch_size: int = 32) -> Trace:
    """Run the unreduced ``model`` over ``images [B, 3, H, W]`` in chunks of ``batch_size``; see the module
    docstring. ``r`` is how many pairs each block's matching takes (clipped to what the block allows)."""
    depth, num_prefix = len(model.blocks), model.num_prefix_tokens
    inputs: list[list[Tensor]] = [[] for _ in range(depth)]
    linearity: list[list[Tensor]] = [[] for _ in range(depth)]
    outputs = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            x = embed(model, chunk)
            for i, block in enumerate(model.blocks):
                inputs[i].append(x)
                y, metric = attention_half(block, x)
                pairs = min(r, max_reduction(x.shape[1], num_prefix))
                matching = bipartite_soft_matching(metric, pairs, num_prefix)
                pair = matched_pairs(y, matching, num_prefix)  # two [b, pairs, C]
                linearity[i].append(linearity_ratio(partial(mlp_half, block), *pair))
                x = mlp_half(block, y)
            outputs.append(pooled_output(model, x))
    return Trace([torch.cat(t) for t in inputs], torch.cat(outputs), [torch.cat(t) for t in linearity])
