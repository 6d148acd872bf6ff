"""The measured choice under a fidelity floor: the predictions shortlist around the floor, forwards decide.

The additive damage prediction is blind to context (``shortlist``'s docstring has the figures), so the fastest
candidate *predicted* to keep ``min_cosine`` can miss it, and one predicted to miss can keep it. Here every candidate
is a rung of a *ladder*, a list ordered by more tokens removed: a front (its reducing candidates by increasing
predicted damage) or one mode assignment's stepped schedules (``shortlist.stepped_ladders``). Per round:

- ``around_floor`` lists each ladder's rungs nearest the floor on both sides (the front's ``FRONT_AROUND`` last
  predicted to meet it and first predicted to miss it; a stepped ladder's ``STEPPED_AROUND`` of each), at the
  ladder's ``damage_scale`` (1 in the first round);
- they are run once each on the search images (``damage.verify``) in order of predicted latency, fastest first,
  and the round stops at the first that measures at least the floor (after the candidates as fast as it): nothing
  slower can win;
- per ladder (``next_scale``), from its rungs measured so far: if none passed, its scale rises to the least
  measured / predicted damage of those predicted to pass (the next round lists less reducing rungs); if its
  fastest measured passed, its scale falls to the largest measured / predicted damage of the passes predicted to
  fail (more reducing rungs); otherwise its measurements bracket the floor and it keeps its scale. The search ends
  when no ladder moves, or after ``FLOOR_ROUNDS`` rounds. A scale per ladder: the prediction's error is the
  source's (a front's late-heavy policies are under-predicted several times more than uniform ToMe).

The choice is the fastest predicted candidate whose measured cosine meets the floor (ties: the higher measured
cosine). A floor nothing measured meets is a ``BudgetError`` naming the best measured cosine and its policy.
Forwards: at most ``FLOOR_ROUNDS x (fronts x 2 FRONT_AROUND + stepped ladders x 2 STEPPED_AROUND)``; on a 12-block
ViT under the damage rule (2 fronts, 8 stepped ladders) 3 x (8 + 16) = 72, under the linearity rule 3 x (4 + 4) = 24.
Held-out images never enter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tofu_export.calibration.damage import verify
from tofu_export.calibration.select import Budget, BudgetError, Candidate
from tofu_export.calibration.shortlist import (
    Shortlisted,
    policy_key,
    rule_fronts,
    search_space,
    stepped_ladders,
    unique,
)
from tofu_export.errors import Hint

if TYPE_CHECKING:
    from tofu_export.calibration.state import Calibration

FLOOR_ROUNDS = 3
FRONT_AROUND = 2  # front candidates listed on each side of the floor
STEPPED_AROUND = 1  # stepped schedules listed on each side of the floor
Ladder = tuple[str, Sequence[Candidate], int]  # (source, rungs by more tokens removed, rungs listed each side)


@dataclass(frozen=True)
class Tried:
    """One measured candidate: the round that listed it and the damage scale it was listed at."""

    listed: Shortlisted
    round: int
    damage_scale: float

    @property
    def candidate(self) -> Candidate:
        return self.listed.candidate

    @property
    def cosine(self) -> float:
        return self.listed.measured_cosine

    def ratio(self) -> float:
        """Measured over predicted damage."""
        return (1.0 - self.cosine) / max(self.candidate.damage, 1e-12)

    def to_dict(self) -> dict:
        return self.listed.to_dict() | {"round": self.round, "damage_scale": self.damage_scale}


def around_floor(rungs: Sequence[Candidate], limit: float, count: int) -> list[int]:
    """Indices of the ``count`` rungs before the first predicted beyond ``limit`` (damage) and of ``count`` from it."""
    first_miss = next((i for i, c in enumerate(rungs) if c.damage > limit), len(rungs))
    return list(range(max(first_miss - count, 0), min(first_miss + count, len(rungs))))


def floor_shortlist(ladders: Sequence[Ladder], limits: Sequence[float]) -> list[tuple[str, Candidate, int]]:
    """Every ladder's rungs around its predicted damage limit (``around_floor``) with the ladder's index, by
    increasing predicted latency (ties: less predicted damage), each policy once (its first source kept)."""
    listed = [(f"{source} #{i}", rungs[i], k) for k, ((source, rungs, count), limit) in
              enumerate(zip(ladders, limits, strict=True)) for i in around_floor(rungs, limit, count)]
    return unique(sorted(listed, key=lambda x: (x[1].latency_ms, x[1].damage)))


def best_passing(tried: Sequence[Tried], min_cosine: float) -> Tried | None:
    """The fastest predicted of ``tried`` measuring at least ``min_cosine`` (ties: the higher measured cosine)."""
    passing = [t for t in tried if t.cosine >= min_cosine]
    return min(passing, key=lambda t: (t.candidate.latency_ms, -t.cosine)) if passing else None


def next_scale(rungs: Sequence[Candidate], tried: Mapping[tuple, Tried], min_cosine: float,
               scale: float) -> float | None:
    """A ladder's damage scale for the next round (module docstring) from its rungs measured so far, or None where
    its measurements bracket the floor (or cannot move it)."""
    floor = 1.0 - min_cosine
    mine = [tried[policy_key(c)] for c in rungs if policy_key(c) in tried]
    if not mine:
        return None
    if best_passing(mine, min_cosine) is None:
        failed = [t.ratio() for t in mine if t.candidate.damage * scale <= floor]  # predicted to pass
        return max(min(failed), scale * 1.05) if failed else None
    fastest = min(mine, key=lambda t: t.candidate.latency_ms)
    if fastest.cosine >= min_cosine and policy_key(fastest.candidate) != policy_key(rungs[-1]):  # it passed
        passed = [t.ratio() for t in mine if t.cosine >= min_cosine and t.candidate.damage * scale > floor]
        return min(max(passed), scale / 1.05) if passed else None
    return None


def choose_floor(ladders: Sequence[Ladder], measure: Callable[[Candidate], float], min_cosine: float,
                 rounds: int = FLOOR_ROUNDS) -> tuple[Candidate | None, list[Tried]]:
    """The fastest predicted candidate measuring at least ``min_cosine`` (None if none did) and every measurement,
    in the order taken (module docstring). ``measure``: one forward on the search images, the mean cosine."""
    tried: dict[tuple, Tried] = {}
    scales = [1.0] * len(ladders)
    for k in range(rounds):
        best = best_passing(list(tried.values()), min_cosine)
        bound = best.candidate.latency_ms if best else math.inf
        for source, c, ladder in floor_shortlist(ladders, [(1.0 - min_cosine) / s for s in scales]):
            if c.latency_ms > bound:
                break  # slower than a measured pass: it cannot win
            if policy_key(c) not in tried:
                tried[policy_key(c)] = Tried(Shortlisted(source, c, measure(c)), k, scales[ladder])
                if tried[policy_key(c)].cosine >= min_cosine:
                    bound = min(bound, c.latency_ms)
        moved = [next_scale(rungs, tried, min_cosine, s) for (_, rungs, _), s in zip(ladders, scales, strict=True)]
        if all(m is None for m in moved):
            break
        scales = [s if m is None else m for s, m in zip(scales, moved, strict=True)]
    best = best_passing(list(tried.values()), min_cosine)
    return (best.candidate if best else None), list(tried.values())


def unreachable(tried: Sequence[Tried], min_cosine: float, baseline_ms: float, r: int) -> BudgetError:
    """The error for a floor no measured candidate met: the best measured cosine and the policy that reaches it."""
    if not tried:
        return BudgetError("no policy that removes tokens was found at this r; calibrate with a smaller r",
                           hint=Hint("r", str(max(r // 2, 1))))
    best = max(tried, key=lambda t: (t.cosine, -t.candidate.latency_ms))
    c = best.candidate
    modes = "/".join(sorted({m for m, k in zip(c.modes, c.r, strict=True) if k}))
    return BudgetError(
        f"no policy measured keeps min_cosine={min_cosine}: the best of {len(tried)} run on the search images "
        f"measures {best.cosine:.5f} ({best.listed.source}: r {list(c.r)}, {modes}, predicted "
        f"{baseline_ms / c.latency_ms:.2f}x). Ask for at most that, or calibrate with a smaller r.",
        hint=Hint("min_cosine", f"{math.floor(best.cosine * 1e4) / 1e4:.4f}", "the best measured policy at this r",
                  alternative=Hint("r", str(max(r // 2, 1)))),
    )


def floor_choice(calibration: Calibration, budget: Budget, rule: str,
                 on_step: Callable[[], None] | None = None) -> tuple[Candidate, list[dict], dict]:
    """A fidelity floor's pick under ``rule`` (module docstring): the chosen candidate, its attempt record and the
    record of every candidate measured (source, predictions, measured cosine, round) for the policy."""
    c = calibration
    assignments, choices, scaled, latency, tokens0, prefix = search_space(c, rule)
    ladders = [(name, [x for x in front if any(x.r)], FRONT_AROUND) for name, front in rule_fronts(c, rule).items()]
    ladders += [(name, rungs, STEPPED_AROUND)
                for name, rungs in stepped_ladders(assignments, choices, scaled, latency, tokens0, prefix)]

    def measure(x: Candidate) -> float:
        cosine = verify(c.model, c.trace, x.modes, x.r, c.prop_attn)
        if on_step is not None:
            on_step()
        return cosine

    chosen, tried = choose_floor(ladders, measure, budget.min_cosine)
    if chosen is None:
        raise unreachable(tried, budget.min_cosine, c.baseline_ms, c.r)
    pick = next(t for t in tried if t.candidate == chosen)
    attempts = [{"modes": list(chosen.modes), "r": list(chosen.r), "damage_scale": pick.damage_scale,
                 "predicted_cosine": 1.0 - chosen.damage * pick.damage_scale, "measured_cosine": pick.cosine,
                 "predicted_ms": chosen.latency_ms}]
    record = {"choice": "measured: the candidates around the floor run once each on the search images, fastest "
                        "predicted first; the fastest measuring at least the floor chosen (calibration.floor)",
              "candidates": [t.to_dict() | {"chosen": t.candidate == chosen} for t in tried]}
    return chosen, attempts, record
