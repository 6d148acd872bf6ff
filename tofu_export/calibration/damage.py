"""Damage to the final output of reducing tokens in ONE block alone, per block and reduce mode.

For block ``i`` and mode ``m`` the model is patched with ``r`` in block ``i`` only (every other block removes
nothing) and run from the cached input of block ``i`` (``Trace.inputs[i]``): blocks before ``i`` are identical to the
unreduced model, so they are never run again. Damage is ``1 - mean cosine`` of the pooled output to the
unreduced model's, over the calibration images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tofu_export.calibration.trace import Trace
from tofu_export.merge import REDUCE_MODES
from tofu_export.models.family import family_of, patched


def cosine_to(reference: Tensor, output: Tensor) -> Tensor:
    """Per-image cosine of ``output [B, D]`` to ``reference [B, D]``, in float64: ``[B]``."""
    return F.cosine_similarity(output.double(), reference.double(), dim=-1)


def run_from_block(model: nn.Module, x: Tensor, start: int, *, batch_size: int = 32) -> Tensor:
    """Run a (patched) model's blocks ``start..`` and head on block ``start``'s input ``x [B, N, C]``: ``[B, D]``."""
    family = family_of(model)
    with torch.no_grad():
        outputs = [family.pooled_output(model, family.run_blocks(model, chunk, start)) for chunk in x.split(batch_size)]
    return torch.cat(outputs)


def single_block_damage(
    model: nn.Module,
    trace: Trace,
    r: int,
    *,
    modes: Sequence[str] = REDUCE_MODES,
    prop_attn: bool = True,
    on_step: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """``{mode: [depth] damage}``: ``1 - mean cosine`` of reducing ``r`` tokens in block i alone with ``mode``.

    Leaves ``model`` as it was. ``on_step`` is called after each (block, mode) evaluation.
    """
    depth = family_of(model).depth(model)
    damage: dict[str, list[float]] = {mode: [] for mode in modes}
    for i in range(depth):
        for mode in modes:
            r_list = [r if j == i else 0 for j in range(depth)]
            with patched(model, r=r_list, mode=[mode] * depth, prop_attn=prop_attn):
                output = run_from_block(model, trace.inputs[i], i)
            damage[mode].append(float(1.0 - cosine_to(trace.reference, output).mean()))
            if on_step is not None:
                on_step()
    return damage
