"""Destinations on a token grid: one per ``s x s`` window, fixed when the model is built.

ToMe for SD draws the destination of every window at random on every call; an exported graph must not contain a
random op, so here the draw happens once (from ``seed``) and is frozen into constant index tensors. ``seed=None``
takes the top-left token of every window (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WindowLayout:
    """Which tokens of an ``h x w`` grid are destinations. Positions are row-major token indices.

    ``order`` lists the tokens as ``[sources..., destinations...]`` and ``inverse`` undoes it:
    ``cat([src, dst])[:, inverse]`` is the original sequence.
    """

    height: int
    width: int
    src: Tensor  # [Ns] positions of the source tokens (matched onto destinations)
    dst: Tensor  # [Nd] positions of the destination tokens, one per window
    inverse: Tensor  # [N] index of every position in cat([src, dst])

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def num_src(self) -> int:
        return int(self.src.numel())

    @property
    def num_dst(self) -> int:
        return int(self.dst.numel())


def window_layout(height: int, width: int, stride: int = 2, seed: int | None = None) -> WindowLayout:
    """One destination per full ``stride x stride`` window of an ``height x width`` grid; every other token
    (including those of partial windows at the border) is a source.

    ``seed`` draws each window's destination once (``torch.Generator``); None takes the window's top-left token.
    """
    if stride < 1 or height < stride or width < stride:
        raise ValueError(f"a {height}x{width} grid has no full {stride}x{stride} window")
    rows, cols = height // stride, width // stride
    if seed is None:
        offset = torch.zeros(rows * cols, dtype=torch.long)
    else:
        offset = torch.randint(stride * stride, (rows * cols,), generator=torch.Generator().manual_seed(seed))
    win_y = torch.arange(rows).repeat_interleave(cols) * stride  # [Nd] window origins
    win_x = torch.arange(cols).repeat(rows) * stride
    dst = (win_y + offset // stride) * width + win_x + offset % stride  # [Nd]
    is_dst = torch.zeros(height * width, dtype=torch.bool)
    is_dst[dst] = True
    src = torch.arange(height * width)[~is_dst]  # [Ns]
    order = torch.cat([src, dst])  # [N]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return WindowLayout(height, width, src, dst, inverse)
