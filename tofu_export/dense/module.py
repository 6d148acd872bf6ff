"""One block's frozen dense reduction as an ``nn.Module``: its window layout as buffers, its r and mode."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from tofu_export.dense.tofu import DenseMatching, dense_tofu, match_dense, reduce_dense, unmerge_dense
from tofu_export.dense.windows import WindowLayout, window_layout
from tofu_export.names import REDUCE_MODES, ReduceMode


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

    @property
    def layout(self) -> WindowLayout:
        return WindowLayout(self.height, self.width, self.src, self.dst, self.inverse)

    def match(self, metric: Tensor) -> DenseMatching:
        """The matching of ``r`` tokens for ``metric [B, N, C]``."""
        return match_dense(metric, self.layout, self.r)

    def forward(self, x: Tensor, fn: Callable[[Tensor], Tensor], matching: DenseMatching | None = None) -> Tensor:
        """``fn`` applied to ``x [B, N, C]`` with ``r`` tokens reduced; returns ``[B, N, C']``. ``matching``
        (default: matched on ``x``) lets sub-layers of one block share one."""
        if self.r == 0:
            return fn(x)
        if matching is None:
            return dense_tofu(x, self.layout, self.r, self.mode, fn)
        return unmerge_dense(fn(reduce_dense(x, matching, self.layout, self.mode)), matching)

    def extra_repr(self) -> str:
        return f"{self.height}x{self.width}, r={self.r}, mode={self.mode}, stride={self.stride}, seed={self.seed}"


def tokens_to_remove(num_tokens: int, ratio: float, num_src: int) -> int:
    """``r = int(ratio * N)``, clipped to the sources there are (``ratio`` in ``[0, 1)``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio {ratio} is out of range: it must be in [0, 1)")
    return min(int(ratio * num_tokens), num_src)
