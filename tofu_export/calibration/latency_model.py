"""The latency model calibration predicts with: one block's measured latency per reduce mode at a few token counts.

Pure data and arithmetic (no torch), so a budget can be checked before a model is loaded. ``calibration.latency``
measures it; ``select``, ``shortlist`` and ``floor`` predict with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tofu_export.schedule import plan_tokens

NONE = "none"  # the block without token reduction


@dataclass(frozen=True)
class BlockLatency:
    """Measured median latencies (ms) of one block at ``tokens[k]`` tokens, per variant, and of the rest."""

    r: int
    tokens: list[int]  # ascending token counts measured
    block_ms: dict[str, list[float]]  # "none" | "prune" | "mean" | "mlerp" -> [len(tokens)] median ms
    spread_ms: dict[str, list[float]]  # interquartile range over rounds ("none": of its ms; else: of it - none)
    stem_ms: float  # patch embedding, final norm and head (the model with no blocks)
    rounds: int
    backend: str
    mlp_ms_per_token: list[float] = field(default_factory=list)  # [len(tokens)] MLP ms per token (0: not priced)
    unsized_ms: list[float] = field(default_factory=list)  # [len(tokens)] "none" entered without sizes ([]: not timed)

    def block(self, mode: str, n: int, removed: int | None = None, sized: bool = True) -> float:
        """ms of a block receiving ``n`` tokens that removes ``removed`` (default ``r``) with ``mode`` (``"none"``:
        removes nothing); without ``sized`` (no block before it merged: no token sizes, so no proportional-attention
        mask) less the mask's cost, ``"none"`` less ``unsized_ms`` at ``n``."""
        ms = interpolate_linear(self.tokens, self.block_ms[mode], n)
        if not sized and self.unsized_ms:
            ms -= max(interpolate_linear(self.tokens, self.block_ms[NONE], n)
                      - interpolate_linear(self.tokens, self.unsized_ms, n), 0.0)
        if mode == NONE or removed is None or removed == self.r or not self.mlp_ms_per_token:
            return ms
        return ms + (self.r - removed) * interpolate_linear(self.tokens, self.mlp_ms_per_token, n)

    def predict_ms(self, tokens0: int, num_prefix: int, r: Sequence[int], modes: Sequence[str]) -> float:
        """Predicted latency of a model whose block i removes ``r[i]`` tokens with ``modes[i]``."""
        plan = plan_tokens(tokens0, num_prefix, r, warn=False)
        total, sized = self.stem_ms, False
        for n, removed, mode in zip(plan.tokens, plan.r, modes, strict=True):
            total += self.block(mode if removed else NONE, n, removed, sized)
            sized = sized or merges(mode, removed)
        return total

    def to_dict(self) -> dict:
        return asdict(self)


def merges(mode: str, removed: int) -> bool:
    """Whether a block that removes ``removed`` tokens with ``mode`` leaves token sizes behind it (pruning does not:
    ``merge.reduce_tokens``), and so proportional attention's mask in every block after it."""
    return removed > 0 and mode != "prune"


def interpolate_linear(xs: Sequence[float], ys: Sequence[Any], x: float) -> Any:
    """``ys`` (numbers or arrays, one per ascending ``xs``) at ``x``: on the line between the two ``xs`` around it,
    extrapolated along the end segment's line beyond either end; two equal ``xs`` give their ``ys``' mean."""
    if len(xs) == 1:
        return ys[0]
    k = min(max(int(np.searchsorted(xs, x)) - 1, 0), len(xs) - 2)
    if xs[k + 1] == xs[k]:
        return (ys[k] + ys[k + 1]) / 2
    return ys[k] + (ys[k + 1] - ys[k]) * (x - xs[k]) / (xs[k + 1] - xs[k])
