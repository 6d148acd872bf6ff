"""The linearity criterion: how far a block is from linear on the token pairs its matching would reduce.

ToFu (Kim et al., WACV 2024) prunes where a block responds non-linearly to interpolated tokens and merges where it
responds close to linearly. Merging happens between a block's attention and its MLP, so the map that sees the
merged token is the block's MLP half, applied token by token:

    f(y) = y + ls2(mlp(norm2(y)))            y [.., C]: a token after the block's attention (residual included)

For each pair ``(y1, y2)`` that bipartite matching on the block's keys would reduce (source in set A, its
destination in set B), the criterion is

    L(y1, y2) = || f((y1 + y2) / 2) - (f(y1) + f(y2)) / 2 || / || f(y1) - f(y2) ||

0 for a linear f; larger means merging (interpolating) the pair gives the MLP an input whose output is far from
the average of what the two tokens would have produced. The denominator makes it scale-free across blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tofu_export.merge import Matching, split_sets

TokenMap = Callable[[Tensor], Tensor]  # [..., C] -> [..., C], token by token
_EPS = 1e-12


def matched_pairs(y: Tensor, matching: Matching, num_prefix: int) -> tuple[Tensor, Tensor]:
    """The ``r`` (source, destination) token pairs of ``matching`` in ``y [B, N, C]``: two ``[B, r, C]``."""
    _, a, b = split_sets(y, num_prefix)
    channels = y.shape[-1]
    src = a.gather(1, matching.src_idx.expand(-1, -1, channels))
    dst = b.gather(1, matching.dst_idx.expand(-1, -1, channels))
    return src, dst


def linearity_ratio(f: TokenMap, y1: Tensor, y2: Tensor) -> Tensor:
    """``L(y1, y2)`` of the module docstring for token pairs ``y1, y2 [B, r, C]``: ``[B, r]``."""
    with torch.no_grad():
        f1, f2 = f(y1), f(y2)
        gap = f((y1 + y2) / 2) - (f1 + f2) / 2
        return gap.norm(dim=-1) / (f1 - f2).norm(dim=-1).clamp_min(_EPS)


LINEARITY_THRESHOLD = 0.05  # mean criterion above which the linearity rule prunes (DINOv2-S/14: 0.005-0.06)


def linearity_modes(linearity: list[Tensor], threshold: float = LINEARITY_THRESHOLD) -> list[str]:
    """The paper's rule per block: ``"prune"`` where the mean criterion ``[B, r_i]`` exceeds ``threshold`` (the
    block responds non-linearly to interpolated tokens), ``"mlerp"`` where it is closer to linear."""
    return ["prune" if float(x.mean()) > threshold else "mlerp" for x in linearity]
