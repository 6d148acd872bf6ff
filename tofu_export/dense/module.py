"""One block's frozen dense reduction as an ``nn.Module``: its window layout as buffers, its r and mode.

In an exported graph the reduction's nodes (matching, merge, unmerge) are named ``.../tofu/<op>`` and the wrapped
sub-layer's ``.../tofu/sublayer/...``: ``check --costs`` counts the first per reduced sub-layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

from tofu_export.dense.tofu import DenseMatching, dense_tofu, match_dense
from tofu_export.dense.windows import WindowLayout, window_layout
from tofu_export.names import REDUCE_MODES, ReduceMode


class SharedMatching:
    """The matching of one block's current forward, shared by its reduced sub-layers (plain Python state: the
    first reduced sub-layer's ``DenseToFu`` sets it, the block's last sub-layer drops it, so nothing outlives a
    forward)."""

    def __init__(self) -> None:
        self.matching: DenseMatching | None = None


class SubLayer(nn.Module):
    """Runs the wrapped sub-layer on the reduced tokens: its own module scope in an exported graph."""

    def forward(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return fn(x)


class DenseToFu(nn.Module):
    """Reduce ``r`` of the ``height x width`` tokens before a sub-layer and unmerge after (``tofu.dense_tofu``).

    The layout's index tensors are non-persistent buffers: they follow ``.to(device)`` and are constants in an
    exported graph, and they never enter a state dict.
    """

    def __init__(self, height: int, width: int, ratio: float, mode: ReduceMode, stride: int = 2,
                 seed: int | None = None) -> None:
        super().__init__()
        if mode not in REDUCE_MODES:
            raise ValueError(f"unknown reduce mode {mode!r}; expected one of {REDUCE_MODES}")
        layout = window_layout(height, width, stride, seed)
        self.height, self.width, self.mode, self.stride, self.seed = height, width, mode, stride, seed
        self.r = tokens_to_remove(height * width, ratio, layout.num_src)
        self.ratio = ratio
        self.register_buffer("src", layout.src, persistent=False)
        self.register_buffer("dst", layout.dst, persistent=False)
        self.register_buffer("inverse", layout.inverse, persistent=False)
        self.sublayer = SubLayer()

    @property
    def layout(self) -> WindowLayout:
        return WindowLayout(self.height, self.width, self.src, self.dst, self.inverse)

    def match(self, metric: Tensor) -> DenseMatching:
        """The matching of ``r`` tokens for ``metric [B, N, C]``."""
        return match_dense(metric, self.layout, self.r)

    def forward(self, x: Tensor, fn: Callable[[Tensor], Tensor], shared: SharedMatching | None = None) -> Tensor:
        """``fn`` applied to ``x [B, N, C]`` with ``r`` tokens reduced; returns ``[B, N, C']`` (``tofu.dense_tofu``).
        ``shared`` lets the sub-layers of one block share one matching: the first matches on its ``x``."""
        matching = None
        if shared is not None and self.r > 0:
            matching = shared.matching = shared.matching if shared.matching is not None else self.match(x)
        return dense_tofu(x, self.layout, self.r, self.mode, functools.partial(self.sublayer, fn), matching)

    def extra_repr(self) -> str:
        return f"{self.height}x{self.width}, r={self.r}, mode={self.mode}, stride={self.stride}, seed={self.seed}"


def tokens_to_remove(num_tokens: int, ratio: float, num_src: int) -> int:
    """``r = int(ratio * N)``, clipped to the sources there are (``ratio`` in ``[0, 1)``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} is out of range: it must be in [0, 1)")
    return min(int(ratio * num_tokens), num_src)
