"""Damage to the final output of reducing tokens in ONE block alone, per block and reduce mode.

For block ``i`` and mode ``m`` the model is patched with ``r`` in block ``i`` only (every other block removes
nothing) and run from the cached input of block ``i`` (``Trace.inputs[i]``): blocks before ``i`` are identical to the
unreduced model, so they are never run again. Damage is ``1 - mean cosine`` of the pooled output to the
unreduced model's, over the damage images: at most ``images.DAMAGE_IMAGES`` of the search images (``damage_trace``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tofu_export.calibration.images import DAMAGE_IMAGES, check_damage_images
from tofu_export.calibration.trace import BATCH, Trace
from tofu_export.images import evenly_spaced
from tofu_export.models.family import family_of, patched
from tofu_export.names import REDUCE_MODES


def damage_trace(tr: Trace, count: int | None = DAMAGE_IMAGES) -> Trace:
    """The images of ``tr`` the damage per block (and the anchors) are measured on: ``count`` of them evenly spread
    (``images.evenly_spaced``), all of them where ``count`` is None or not below their number."""
    check_damage_images(count)
    total = len(tr.reference)
    return tr if count is None or count >= total else tr.subset(evenly_spaced(range(total), count))


def cosine_to(reference: Tensor, output: Tensor) -> Tensor:
    """Per-image cosine of ``output [B, D]`` to ``reference [B, D]``, in float64: ``[B]``."""
    return F.cosine_similarity(output.double(), reference.double(), dim=-1)


def run_from_block(model: nn.Module, x: Tensor, start: int, *, batch_size: int = BATCH) -> Tensor:
    """Run a (patched) model's blocks ``start..`` and head on block ``start``'s input ``x [B, N, C]``: ``[B, D]``."""
    family = family_of(model)
    with torch.no_grad():
        outputs = [family.pooled_output(model, family.run_blocks(model, chunk, start)) for chunk in x.split(batch_size)]
    return torch.cat(outputs)


def policy_cosines(model: nn.Module, tr: Trace, modes: Sequence[str], r: Sequence[int], prop_attn: bool) -> Tensor:
    """Per-image cosine ``[B]`` to the unreduced model of really running the policy ``(modes, r)`` on the traced
    images (``model`` left unpatched)."""
    with patched(model, r=list(r), mode=list(modes), prop_attn=prop_attn):
        return cosine_to(tr.reference, run_from_block(model, tr.inputs[0], 0))


FLOOR_BATCH = 4  # images a floor's candidate runs between two checks of its early stop: DINOv2-S/14 under ToMe
# r=20 took 1.056 of the time per image at 4 as at 8 (bench/results/forward_batch_4/), but a certain miss stops up to
# 4 images sooner: the default floor's search ran 0.96-0.98 of its time (bench/results/floor_early_stop_batch4/)


def policy_cosines_to_floor(model: nn.Module, tr: Trace, modes: Sequence[str], r: Sequence[int], prop_attn: bool,
                            floor: float, *, order: Tensor | None = None, batch_size: int = FLOOR_BATCH) -> Tensor:
    """``policy_cosines`` run ``batch_size`` images at a time, in ``order`` (a permutation of the ``B`` traced
    images' indices; None: as traced), and stopped once ``out_of_reach``: per-image cosines ``[k]`` of the first
    ``k <= B`` images in that order, ``k < B`` only for a certain miss (its mean over the ``k`` is below ``floor``
    too). A candidate that keeps ``floor`` runs on every image, as with ``policy_cosines``."""
    total = len(tr.reference)
    index = torch.arange(total) if order is None else order  # [B]
    cosines = tr.reference.new_zeros(0, dtype=torch.float64)  # [k]
    with patched(model, r=list(r), mode=list(modes), prop_attn=prop_attn):
        for start in range(0, total, batch_size):
            chunk = index[start:start + batch_size]  # [b]
            cosine = cosine_to(tr.reference[chunk], run_from_block(model, tr.inputs[0][chunk], 0))  # [b]
            cosines = torch.cat([cosines, cosine])
            if out_of_reach(cosines, total, floor):
                break
    return cosines


def out_of_reach(cosines: Tensor, total: int, floor: float) -> bool:
    """Whether a mean over ``total`` images cannot reach ``floor`` when the first ``len(cosines)`` measured
    ``cosines [k]``, whatever the others measure."""
    return highest_mean(float(cosines.sum()), len(cosines), total) < floor


def highest_mean(measured_sum: float, measured: int, total: int) -> float:
    """The highest mean cosine over ``total`` images that ``measured`` of them summing to ``measured_sum`` leave
    possible (a cosine is at most 1)."""
    return (measured_sum + total - measured) / total


def verify(model: nn.Module, tr: Trace, modes: Sequence[str], r: Sequence[int], prop_attn: bool) -> float:
    """Mean cosine to the unreduced model of really running the policy ``(modes, r)`` on the traced images
    (``policy_cosines``' mean)."""
    return float(policy_cosines(model, tr, modes, r, prop_attn).mean())


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
            damage[mode].append(block_damage(model, trace, i, mode, r, prop_attn))
            if on_step is not None:
                on_step()
    return damage


def block_damage(model: nn.Module, trace: Trace, block: int, mode: str, removed: int, prop_attn: bool) -> float:
    """``1 - mean cosine`` of removing ``removed`` tokens with ``mode`` in ``block`` alone (blocks ``block..`` run
    from the traced input)."""
    depth = family_of(model).depth(model)
    r_list = [removed if j == block else 0 for j in range(depth)]
    with patched(model, r=r_list, mode=[mode] * depth, prop_attn=prop_attn):
        output = run_from_block(model, trace.inputs[block], block)
    return float(1.0 - cosine_to(trace.reference, output).mean())


def damage_by_r(
    model: nn.Module,
    trace: Trace,
    choices: Sequence[int],
    r: int,
    *,
    also: Sequence[str] = (),
    also_same_kind: bool = False,
    modes: Sequence[str] = REDUCE_MODES,
    prop_attn: bool = True,
    on_step: Callable[[], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, dict[int, list[float]]]:
    """``{mode: {removed: [depth] damage}}`` for every positive ``removed`` in ``choices``.

    Measured: every mode at ``r`` (``single_block_damage``); at the largest choice, per block, only the mode least
    damaging at ``r``, and the mode ``also[i]`` names (e.g. the linearity rule's) where it is the other kind of
    reduction (``"prune"`` against the merges; with ``also_same_kind``, wherever it differs). The other modes at the
    largest choice take the block's growth exponent from a measured mode, of their own kind where one was measured:
    the pairs removed are the same for every mode (matching runs on the keys, before any mode acts), so how fast
    damage grows with the pairs is the block's, and mean and MLERP fold the same pairs into the same destinations
    (on DINOv2-S/14 their damage at r lay within 25% of each other in 10 of 11 reducing blocks, pruning's 1.6x to
    1000x above). The counts in between (and below r) are derived by ``derive_damage``. ``on_step`` is called after
    each measurement; ``on_total`` with the number of measurements, once the ones at the largest choice are known
    (after those at r)."""
    at_r = single_block_damage(model, trace, r, modes=modes, prop_attn=prop_attn, on_step=on_step)
    table: dict[str, dict[int, list[float]]] = {m: {r: at_r[m]} for m in modes}
    top = max(choices)
    if top > r:
        depth = len(at_r[modes[0]])
        best = [min(modes, key=lambda m: at_r[m][i]) for i in range(depth)]  # [depth] least damaging at r
        at_top = [{best[i], *(m for m in also[i:i + 1] if also_same_kind or _kind(m) != _kind(best[i]))}
                  for i in range(depth)]  # [depth] modes measured at the largest choice
        if on_total is not None:
            on_total(depth * len(modes) + sum(len(measured) for measured in at_top))
        for m in modes:
            table[m][top] = [0.0] * depth
        for i, measured in enumerate(at_top):
            for m in measured:
                table[m][top][i] = block_damage(model, trace, i, m, top, prop_attn)
                if on_step is not None:
                    on_step()
            for m in set(modes) - measured:
                kin = [k for k in measured if _kind(k) == _kind(m)]
                ref = min(kin or measured, key=lambda k: at_r[k][i])
                exponent = _exponent(at_r[ref][i], table[ref][top][i], top / r)
                table[m][top][i] = max(at_r[m][i], 0.0) * (top / r) ** exponent
    for m in modes:
        known = dict(table[m])
        table[m] = {k: known[k] if k in known else derive_damage(known, k) for k in choices if k > 0}
    return table


def _kind(mode: str) -> str:
    """``"prune"`` or ``"merge"`` (mean and MLERP fold the same pairs into their destinations)."""
    return "prune" if mode == "prune" else "merge"


def _exponent(d_lo: float, d_hi: float, ratio: float) -> float:
    """The power-law exponent from ``d_lo`` to ``d_hi`` over a count ``ratio``, at least 1 (1 without damage)."""
    if d_lo <= 0 or d_hi <= 0:
        return 1.0
    return max(math.log(d_hi / d_lo) / math.log(ratio), 1.0)


def derive_damage(measured: dict[int, list[float]], removed: int) -> list[float]:
    """Per-block damage at ``removed`` tokens from damage measured at other counts (``{count: [depth]}``), by a
    power law ``d(k) = d(k0) * (k / k0) ** p`` through the two measured counts nearest
    ``removed`` (``p`` fitted per block, at least 1).

    Why a power law with ``p >= 1``: matching removes the most similar pairs first, so each further pair costs at
    least as much as the ones before, and damage grows at least linearly from ``d(0) = 0``. Below the smallest
    measured count this is an extrapolation towards 0, bounded by the straight line through the origin."""
    counts = sorted(measured)
    if len(counts) == 1:  # one measured count: the straight line through the origin
        return [max(d, 0.0) * removed / counts[0] for d in measured[counts[0]]]
    k = min(max(bisect.bisect_left(counts, removed) - 1, 0), len(counts) - 2)  # the segment around removed
    lo, hi = counts[k], counts[k + 1]
    derived = []
    for d_lo, d_hi in zip(measured[lo], measured[hi], strict=True):
        derived.append(max(d_lo, 0.0) * (removed / lo) ** _exponent(d_lo, d_hi, hi / lo))
    return derived
