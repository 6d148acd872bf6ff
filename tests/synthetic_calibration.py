"""A synthetic calibration's latency model and damage table for the choice tests: three blocks, r=4, no export."""

from __future__ import annotations

from collections.abc import Sequence

from tofu_export.calibration.latency_model import NONE, BlockLatency
from tofu_export.calibration.select import r_choices


def block_latency(tokens: Sequence[int], r: int) -> BlockLatency:
    """One block's ms at ``tokens``: 0.1 ms a token unreduced; prune 0.02 ms cheaper, mean 0.01 and MLERP 0.02 ms
    dearer; 0.5 ms outside the blocks."""
    none = [n * 0.1 for n in tokens]
    modes = {"prune": [v - 0.02 for v in none], "mean": [v + 0.01 for v in none], "mlerp": [v + 0.02 for v in none]}
    return BlockLatency(r, list(tokens), {NONE: none, **modes}, {}, 0.5, 10, "test", [0.06, 0.06, 0.06])


def late_blocks_look_free(r: int) -> dict[str, dict[int, list[float]]]:
    """Single-block damages where late blocks look free on their own: the additive prediction favours reducing
    there. Per mode, per r choice, per block (3 blocks)."""
    base = {"prune": [0.010, 0.004, 0.0002], "mean": [0.002, 0.0005, 0.00001], "mlerp": [0.003, 0.0004, 0.00002]}
    return {m: {k: [v * (k / r) ** 1.5 for v in values] for k in r_choices(r) if k} for m, values in base.items()}
