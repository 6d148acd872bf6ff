"""Choose per-block modes and r from the per-block measurements, under a budget.

The search space: block i removes one of ``r_choices(r)`` = {0, r/2, r, 3r/2, 2r} tokens (rounded; at most what
``schedule.plan_tokens`` lets it remove at the token count it receives), with prune, mean or MLERP (or, under the
linearity rule, with the one mode the paper's criterion names for it). Two additive predictions score a candidate:

- damage: the sum over reducing blocks of the damage measured when that block alone removes that many tokens with
  that mode (``1 - cosine``), each mode's scaled by its compounding factor (``Calibration.scaled_damage``);
  predicted cosine = ``1 - sum``;
- latency: ``BlockLatency.predict_ms``, for the token count each block then receives.

Block i's latency depends only on how many tokens it receives, so an exact dynamic program over
``(block, tokens entering it)`` keeps the Pareto front of (damage, latency). The front only shortlists: a forward
per candidate on the search images decides (``shortlist`` under a latency budget, ``floor`` under a fidelity floor);
``choose`` is the prediction's own pick (and a latency budget's reachability check).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tofu_export.calibration.latency_model import NONE, BlockLatency, merges
from tofu_export.errors import Hint, UserError
from tofu_export.schedule import max_reduction

RULES = ("damage", "linearity")  # how a block's mode is chosen: its measured damage, or the paper's linearity test


def check_rule(rule: str) -> None:
    """``rule`` must be one of ``RULES`` (checked before anything is measured)."""
    if rule not in RULES:
        raise UserError(f"unknown mode rule {rule!r}; choose one of {', '.join(RULES)}", hint=Hint("rule", "damage"))


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
    r: tuple[int, ...]  # [depth] tokens block i removes, one of r_choices(r)
    damage: float  # predicted 1 - cosine (unscaled sum)
    latency_ms: float  # predicted


Point = tuple[float, float, tuple[str, ...], tuple[int, ...]]  # (damage, ms, modes so far, r so far)
Damage = Mapping[str, Mapping[int, Sequence[float]]]  # mode -> tokens removed -> [depth] single-block damage


def r_choices(r: int) -> tuple[int, ...]:
    """What a block may remove: 0, r/2, r, 3r/2 and 2r, rounded half up, ascending, without repeats."""
    return tuple(sorted({0, *((k * r + 1) // 2 for k in (1, 2, 3, 4))}))


def pareto_front(
    damage: Damage, latency: BlockLatency, tokens0: int, num_prefix: int,
    modes: Sequence[Sequence[str]] | None = None,
) -> list[Candidate]:
    """Every candidate not beaten on both damage and latency by another, by increasing damage.

    ``damage[mode][removed]`` is ``[depth]`` single-block damage; ``tokens0`` enter block 0; ``modes[i]`` (default:
    every measured mode) are the modes block i may use."""
    depth = len(next(iter(next(iter(damage.values())).values())))
    allowed = [list(damage)] * depth if modes is None else [list(m) for m in modes]
    fallback = [a[0] for a in allowed]  # the mode named where a block removes nothing
    # (tokens entering block i, whether token sizes reach it) -> front
    fronts: dict[tuple[int, bool], list[Point]] = {(tokens0, False): [(0.0, latency.stem_ms, (), ())]}
    for i in range(depth):
        grown: dict[tuple[int, bool], list[Point]] = {}
        for (n, sized), front in fronts.items():
            limit = max_reduction(n, num_prefix)
            options = [(0.0, latency.block(NONE, n, sized=sized), fallback[i], 0)]
            options += [(values[i], latency.block(m, n, removed, sized), m, removed)
                        for m in allowed[i] for removed, values in damage[m].items() if 0 < removed <= limit]
            for d, ms, mode, removed in options:
                key = (n - removed, sized or merges(mode, removed))
                grown.setdefault(key, []).extend((fd + d, fms + ms, (*fm, mode), (*fr, removed))
                                                 for fd, fms, fm, fr in front)
        fronts = {key: _prune(points) for key, points in grown.items()}
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


def choose(front: list[Candidate], budget: Budget, baseline_ms: float) -> Candidate:
    """The fastest candidate meeting ``min_cosine``, or the most faithful meeting the latency target.

    A budget no candidate that removes tokens meets is a ``BudgetError`` naming what is reachable: the fastest
    policy for a latency target, the most faithful reducing policy for a fidelity floor (the unreduced model is not
    an answer).
    """
    if budget.min_cosine is not None:
        floor = 1.0 - budget.min_cosine
        reducing = [c for c in front if any(c.r)]
        meeting = [c for c in reducing if c.damage <= floor]
        if not meeting:
            if not reducing:
                raise BudgetError("no policy that removes tokens was found at this r; calibrate with a smaller r",
                                  hint=Hint("r", "8"))
            best = 1.0 - min(c.damage for c in reducing)
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
