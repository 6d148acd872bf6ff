"""Choose per-block modes and an r schedule from the per-block measurements, under a budget.

The search space: block i removes either nothing or ``r`` tokens, with prune, mean or MLERP. Two additive
predictions score a candidate:

- damage: the sum over reducing blocks of the damage measured when that block alone reduces (``1 - cosine``);
  predicted cosine = ``1 - scale * sum``, with ``scale`` 1 until a verification says otherwise;
- latency: ``BlockLatency.predict_ms``, exact for the token count each block then receives.

Block i's latency depends only on how many blocks before it reduced, so an exact dynamic program over
``(block, reductions so far)`` keeps the Pareto front of (damage, latency) and the budget picks one point of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tofu_export.calibration.latency import NONE, BlockLatency
from tofu_export.errors import Hint, UserError
from tofu_export.merge import max_reduction


class BudgetError(UserError):
    """A budget that is malformed, or that no policy in the search space meets."""


@dataclass(frozen=True)
class Budget:
    """Exactly one of: a fidelity floor (``min_cosine``), or a latency target (``speedup`` over the unreduced
    model, or ``max_latency_ms``)."""

    min_cosine: float | None = None
    speedup: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        given = [k for k, v in (("min_cosine", self.min_cosine), ("speedup", self.speedup),
                                ("max_latency_ms", self.max_latency_ms)) if v is not None]
        if len(given) != 1:
            raise BudgetError(f"give exactly one budget (min_cosine, speedup or max_latency_ms), got {given or 'none'}",
                              hint=Hint("min_cosine", "0.995"))
        if self.min_cosine is not None and not 0.0 < self.min_cosine <= 1.0:
            raise BudgetError(f"min_cosine must lie in (0, 1], got {self.min_cosine}", hint=Hint("min_cosine", "0.995"))
        if self.speedup is not None and not self.speedup > 0:
            raise BudgetError(f"speedup must be positive, got {self.speedup}", hint=Hint("speedup", "1.5"))
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise BudgetError(f"max_latency_ms must be positive, got {self.max_latency_ms}",
                              hint=Hint("max_latency_ms"))

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Candidate:
    """One point of the search space, with its predictions."""

    modes: tuple[str, ...]  # [depth]
    r: tuple[int, ...]  # [depth] 0 or the calibration r
    damage: float  # predicted 1 - cosine (unscaled sum)
    latency_ms: float  # predicted


Point = tuple[float, float, tuple[str, ...], tuple[int, ...]]  # (damage, ms, modes so far, r so far)


def pareto_front(
    damage: Mapping[str, list[float]], latency: BlockLatency, tokens0: int, num_prefix: int
) -> list[Candidate]:
    """Every candidate not beaten on both damage and latency by another, by increasing damage.

    ``damage[mode]`` is ``[depth]`` single-block damage at ``latency.r``; ``tokens0`` enter block 0."""
    depth, r = len(next(iter(damage.values()))), latency.r
    fallback = [min(damage, key=lambda m, i=i: damage[m][i]) for i in range(depth)]  # mode named where r = 0
    fronts: dict[int, list[Point]] = {0: [(0.0, latency.stem_ms, (), ())]}  # k reductions so far -> front
    for i in range(depth):
        grown: dict[int, list[Point]] = {}
        for k, front in fronts.items():
            n = tokens0 - k * r
            options = [(0.0, latency.block(NONE, n), fallback[i], 0, k)]
            if max_reduction(n, num_prefix) >= r:
                options += [(damage[m][i], latency.block(m, n), m, r, k + 1) for m in damage]
            for d, ms, mode, removed, k_next in options:
                grown.setdefault(k_next, []).extend((fd + d, fms + ms, (*fm, mode), (*fr, removed))
                                                    for fd, fms, fm, fr in front)
        fronts = {k: _prune(points) for k, points in grown.items()}
    every = _prune([p for front in fronts.values() for p in front])
    return [Candidate(modes, rs, d, ms) for d, ms, modes, rs in every]


def _prune(points: list[Point]) -> list[Point]:
    """Keep the points no other point beats on both damage and latency, by increasing damage."""
    kept, best_ms = [], float("inf")
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if point[1] < best_ms:
            kept.append(point)
            best_ms = point[1]
    return kept


def choose(front: list[Candidate], budget: Budget, baseline_ms: float, damage_scale: float = 1.0) -> Candidate:
    """The fastest candidate meeting ``min_cosine``, or the most faithful meeting the latency target.

    ``damage_scale`` multiplies predicted damage (a verification's measured / predicted). A budget no candidate
    that removes tokens meets is a ``BudgetError`` naming what is reachable: the fastest policy for a latency
    target, the most faithful reducing policy for a fidelity floor (the unreduced model is not an answer).
    """
    if budget.min_cosine is not None:
        floor = 1.0 - budget.min_cosine
        reducing = [c for c in front if any(c.r)]
        meeting = [c for c in reducing if c.damage * damage_scale <= floor]
        if not meeting:
            if not reducing:
                raise BudgetError("no policy that removes tokens was found at this r; calibrate with a smaller r",
                                  hint=Hint("r", "8"))
            best = 1.0 - min(c.damage for c in reducing) * damage_scale
            raise BudgetError(
                f"no policy that removes tokens keeps min_cosine={budget.min_cosine}: the most faithful one is "
                f"predicted at cosine {best:.5f}. Ask for at most that, or calibrate with a smaller r.",
                hint=Hint("min_cosine", f"{math.floor(best * 1e4) / 1e4:.4f}", "the most faithful policy at this r"),
            )
        return min(meeting, key=lambda c: c.latency_ms)
    limit = budget.max_latency_ms if budget.max_latency_ms is not None else baseline_ms / budget.speedup
    meeting = [c for c in front if c.latency_ms <= limit]
    if not meeting:
        fastest = min(front, key=lambda c: c.latency_ms)
        best = baseline_ms / fastest.latency_ms
        if budget.speedup is not None:
            hint = Hint("speedup", f"{best:.2f}", "the fastest policy at this r")
            asked = f"a {budget.speedup:.2f}x speedup"
        else:
            hint = Hint("max_latency_ms", f"{fastest.latency_ms:.1f}", "the fastest policy at this r")
            asked = f"{budget.max_latency_ms:.1f} ms"
        raise BudgetError(
            f"no policy reaches {asked}: the fastest one at r={fastest.r and max(fastest.r)} is predicted "
            f"{fastest.latency_ms:.1f} ms ({best:.2f}x over the unreduced {baseline_ms:.1f} ms). Ask for at most that, "
            "or calibrate with a larger r.",
            hint=hint,
        )
    return min(meeting, key=lambda c: c.damage)
