"""The measured choice under a fidelity floor: the predictions guess where the floor lies, forwards bisect.

The additive damage prediction is blind to context (``shortlist``'s docstring has the figures), so the fastest
candidate *predicted* to keep ``min_cosine`` can miss it, and one predicted to miss can keep it; its error also
varies along one ladder (on DINOv2-S/14, uniform ToMe measured 1.7x its predicted damage at r=16 and 88x at the most
reducing stepped schedule). Every candidate is a rung of a *ladder*, a list ordered by more tokens removed: a front
(its reducing candidates by increasing predicted damage) or one mode assignment's stepped schedules
(``shortlist.stepped_ladders``), between the r choices and one token at a time (as a latency budget's shortlist
has them: the coarse rungs can stop well short of the floor). Candidates are run once each on the search images
(``damage.verify``), in rounds:

- round 0, the prediction's guess: ``around_floor`` lists each ladder's rungs nearest the predicted floor on both
  sides (a front's ``FRONT_AROUND`` last predicted to meet it and first predicted to miss it; a stepped ladder's
  ``STEPPED_AROUND`` of each);
- every later round, bisection on what was measured: each ladder lists the rung midway through its open *bracket*
  (``next_rung``): the rungs past its most reducing rung measured to pass and before its least reducing rung beyond
  that measured to miss, less those predicted slower than the fastest pass so far (they cannot win). A ladder
  whose bracket holds no rung lists nothing. The search ends when no ladder lists a rung: every bracket is closed.
  It ends: a round's first listing always runs (it is no slower than the fastest pass), so every round measures a
  rung never measured before. A fixed number of rounds stopped short: a ladder stepped one token at a time has
  hundreds of rungs, and a round whose first listing passes skips the slower listings of other ladders, so their
  bisection waits a round;
- a round runs its rungs fastest predicted first and stops at the first that measures at least the floor (after
  the candidates as fast as it): nothing slower can win.

A candidate runs on the search images 4 at a time (``damage.FLOOR_BATCH``), hardest first (``shortlist.runs_on``),
and stops as soon as its mean over all of them could not reach the floor whatever the images left measure (every
cosine is at most 1; ``damage.policy_cosines_to_floor``): a certain miss, recorded with the mean of the images it
ran (``images_run``), which is below the floor too. Every decision is the one a run on all the images makes; a pass
always runs on all of them. The predicted floor is often far off and bisection visits far misses (in one default
DINOv2-S/14 calibration, floor 0.995, 7 of round 0's 12 candidates and 19 of all 70 measured below 0.95, 30 below
0.985): such misses stop after a batch or two. Batches of 8 cost what batches of 32 do and 1.01-1.08 of batches of
16 (``trace.BATCH``; ``bench/results/forward_batch/``), batches of 4 1.06 of batches of 8, which the sooner stops
repay (``FLOOR_BATCH``). Where nothing meets the floor, the stopped misses that could still be the best measured are
run on every image before the error names it (``completed``).

The choice is the fastest predicted candidate whose measured cosine meets the floor (ties: the higher measured
cosine); where the calibration has confirm images, the fastest pass runs on them too, and one that misses the floor
over both sets counts as a miss: the bisection resumes (the rungs between it and the next pass, skipped as slower
than it, are listed again), until the fastest pass keeps the floor over both (``confirmed_floor``). A candidate that
fits the search images by chance then costs the search a few forwards, not the rungs it had closed off. A floor
nothing measured meets is a ``BudgetError`` naming the best measured cosine and its policy.
Forwards: at most ``fronts x 2 FRONT_AROUND + stepped ladders x 2 STEPPED_AROUND`` in round 0; after it, a
ladder's bracket at least halves with every rung of it measured, so a ladder of n rungs runs at most
``n.bit_length()`` more (``forward_bound``; 9 for a 12-block ViT's 384 one-token rungs). A round stops at its first
pass and rungs slower than a pass are never run, so far fewer are. Held-out images never enter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tofu_export.calibration.damage import highest_mean
from tofu_export.calibration.select import Budget, BudgetError, Candidate
from tofu_export.calibration.shortlist import (
    CONFIRM_FINALISTS,
    Shortlisted,
    one_token_steps,
    policy_key,
    rule_fronts,
    runs_on,
    search_space,
    stepped_ladders,
    unique,
)
from tofu_export.errors import Hint

if TYPE_CHECKING:
    from torch import Tensor

    from tofu_export.calibration.state import Calibration

FRONT_AROUND = 2  # front candidates listed on each side of the predicted floor in round 0
STEPPED_AROUND = 1  # stepped schedules listed on each side of the predicted floor in round 0
Ladder = tuple[str, Sequence[Candidate], int]  # (source, rungs by more tokens removed, rungs listed each side)
Listing = tuple[str, Candidate]  # (where it came from: "<ladder> #<rung>", the candidate)


@dataclass(frozen=True)
class Tried:
    """One measured candidate and the round that listed it."""

    listed: Shortlisted
    round: int

    @property
    def candidate(self) -> Candidate:
        return self.listed.candidate

    @property
    def cosine(self) -> float:
        """What decides pass or miss: the mean over the search and confirm images where the candidate ran on both
        (``confirmed_floor``), else over the search images."""
        s = self.listed
        return s.measured_cosine if s.combined_cosine is None else s.combined_cosine

    def to_dict(self) -> dict:
        return self.listed.to_dict() | {"round": self.round}


def around_floor(rungs: Sequence[Candidate], limit: float, count: int) -> list[int]:
    """Indices of the ``count`` rungs before the first predicted beyond ``limit`` (damage) and of ``count`` from it."""
    first_miss = next((i for i, c in enumerate(rungs) if c.damage > limit), len(rungs))
    return list(range(max(first_miss - count, 0), min(first_miss + count, len(rungs))))


def floor_shortlist(ladders: Sequence[Ladder], limit: float) -> list[Listing]:
    """Round 0: every ladder's rungs around the predicted damage ``limit`` (``around_floor``), fastest first."""
    return fastest_first([(f"{source} #{i}", rungs[i]) for source, rungs, count in ladders
                          for i in around_floor(rungs, limit, count)])


def fastest_first(listed: Sequence[Listing]) -> list[Listing]:
    """``listed`` by increasing predicted latency (ties: less predicted damage), each policy once (its first source
    kept)."""
    return unique(sorted(listed, key=lambda x: (x[1].latency_ms, x[1].damage)))


def best_passing(tried: Sequence[Tried], min_cosine: float) -> Tried | None:
    """The fastest predicted of ``tried`` measuring at least ``min_cosine`` (ties: the higher measured cosine)."""
    passing = [t for t in tried if t.cosine >= min_cosine]
    return min(passing, key=lambda t: (t.candidate.latency_ms, -t.cosine)) if passing else None


def next_rung(rungs: Sequence[Candidate], tried: Mapping[tuple, Tried], min_cosine: float,
              bound: float) -> int | None:
    """The rung a ladder lists next (module docstring): midway through its open bracket, or None where the bracket
    holds no rung. ``bound``: the predicted latency of the fastest pass so far (``math.inf``: none); a rung
    predicted slower cannot win and is left out wherever it stands (a ladder's latency need not fall at every rung:
    a block that starts reducing pays for its matching before it saves a token)."""
    cosines = {i: tried[policy_key(c)].cosine for i, c in enumerate(rungs) if policy_key(c) in tried}
    lo = max((i for i, cosine in cosines.items() if cosine >= min_cosine), default=-1)
    hi = min((i for i, cosine in cosines.items() if cosine < min_cosine and i > lo), default=len(rungs))
    bracket = [i for i in range(lo + 1, hi) if rungs[i].latency_ms <= bound]
    return bracket[(len(bracket) - 1) // 2] if bracket else None


def forward_bound(ladders: Sequence[Ladder], limit: float) -> int:
    """The most forwards ``choose_floor`` can run (module docstring): round 0's listings, then ``n.bit_length()``
    rungs of every ladder of n rungs."""
    return len(floor_shortlist(ladders, limit)) + sum(len(rungs).bit_length() for _, rungs, _ in ladders)


def next_listing(ladders: Sequence[Ladder], tried: Mapping[tuple, Tried], min_cosine: float) -> list[Listing]:
    """Every ladder's ``next_rung`` after the measurements ``tried``, fastest first."""
    best = best_passing(list(tried.values()), min_cosine)
    bound = best.candidate.latency_ms if best else math.inf
    return fastest_first([(f"{source} #{i}", rungs[i]) for source, rungs, _ in ladders
                          if (i := next_rung(rungs, tried, min_cosine, bound)) is not None])


def choose_floor(ladders: Sequence[Ladder], measure: Callable[[Candidate], float], min_cosine: float,
                 resume: Sequence[Tried] = ()) -> tuple[Candidate | None, list[Tried]]:
    """The fastest predicted candidate measuring at least ``min_cosine`` (None if none did) and every measurement,
    in the order taken (module docstring). ``measure``: one forward on the search images, the mean cosine.
    ``resume``: the measurements to go on from (``confirmed_floor``: a pass the confirm images rejected now counts as
    a miss), the bisection continuing from them in rounds numbered on; none: from round 0's guess."""
    tried = {policy_key(t.candidate): t for t in resume}
    start = max((t.round for t in resume), default=-1) + 1
    listed = next_listing(ladders, tried, min_cosine) if tried else floor_shortlist(ladders, 1.0 - min_cosine)
    for k in itertools.count(start):
        best = best_passing(list(tried.values()), min_cosine)
        bound = best.candidate.latency_ms if best else math.inf
        for source, c in listed:
            if c.latency_ms > bound:
                break  # slower than a measured pass: it cannot win
            if policy_key(c) not in tried:
                tried[policy_key(c)] = Tried(Shortlisted(source, c, measure(c)), k)
                if tried[policy_key(c)].cosine >= min_cosine:
                    bound = min(bound, c.latency_ms)
        listed = next_listing(ladders, tried, min_cosine)
        if not listed:
            break
    best = best_passing(list(tried.values()), min_cosine)
    return (best.candidate if best else None), list(tried.values())


def completed(tried: Sequence[Tried], measure_all: Callable[[Candidate], Tensor], images: int) -> list[Tried]:
    """``tried`` with the misses stopped early (``images_run``) that could still measure the highest run again on
    all ``images`` search images (``measure_all``), most promising first, so that the best measured is exact: a
    stopped miss whose mean could not exceed the best complete one (each cosine at most 1) is left as it is."""
    done = list(tried)
    best = max((t.cosine for t in done if t.listed.images_run is None), default=-math.inf)

    def at_most(t: Tried) -> float:  # the highest mean over every image a stopped miss could still have
        return highest_mean(t.cosine * t.listed.images_run, t.listed.images_run, images)

    stopped = sorted((i for i, t in enumerate(done) if t.listed.images_run is not None),
                     key=lambda i: -at_most(done[i]))
    for i in stopped:
        if at_most(done[i]) <= best:
            break
        t = done[i]
        done[i] = Tried(Shortlisted.run(t.listed.source, t.candidate, measure_all(t.candidate)), t.round)
        best = max(best, done[i].cosine)
    return done


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


def floor_ladders(calibration: Calibration, rule: str) -> list[Ladder]:
    """The ladders a floor bisects (module docstring): the rule's fronts, then per mode assignment and step direction
    the stepped schedules between the r choices and one token at a time (``"<source>, one-token steps"``)."""
    assignments, choices, scaled, latency, tokens0, prefix = search_space(calibration, rule)
    ladders = [(name, [x for x in front if any(x.r)], FRONT_AROUND)
               for name, front in rule_fronts(calibration, rule).items()]
    for steps, suffix in ((choices, ""), (one_token_steps(choices), ", one-token steps")):
        ladders += [(name + suffix, rungs, STEPPED_AROUND)
                    for name, rungs in stepped_ladders(assignments, steps, scaled, latency, tokens0, prefix)]
    return ladders


def confirmed_floor(ladders: Sequence[Ladder], tried: Sequence[Tried], measure: Callable[[Candidate], float],
                    confirm: Callable[[Candidate], Tensor], min_cosine: float, searched: int, confirming: int,
                    finalists: int = CONFIRM_FINALISTS) -> tuple[Candidate, list[Tried]]:
    """The fastest candidate measured to keep ``min_cosine`` on the ``searched`` search images, run on the
    ``confirming`` confirm images (``confirm``: one forward there, the cosine per image): where it keeps the floor
    over both sets (each image weighing the same) it is chosen; where it misses, it counts as a miss from then on and
    the bisection resumes from ``tried`` (``choose_floor`` with ``measure``: the rungs between it and the next pass,
    skipped as slower than it, are listed again), and the fastest pass then runs there next; at most ``finalists``
    confirm runs. None keeping the floor: the confirmed one with the highest mean over both. Returns the choice and
    every measurement, the confirmed ones with their figures added."""
    done = list(tried)
    confirmed: list[Tried] = []
    while len(confirmed) < finalists and (best := best_passing(done, min_cosine)) is not None:
        run = Tried(best.listed.confirmed(confirm(best.candidate), searched, confirming), best.round)
        done = [run if t is best else t for t in done]
        confirmed.append(run)
        if run.cosine >= min_cosine:
            return run.candidate, done
        if len(confirmed) < finalists:
            done = choose_floor(ladders, measure, min_cosine, done)[1]  # the bisection above the next pass reopens
    return max(confirmed, key=lambda t: t.cosine).candidate, done


def floor_choice(calibration: Calibration, budget: Budget, rule: str, on_step: Callable[[], None] | None = None,
                 ladders: Sequence[Ladder] | None = None) -> tuple[Candidate, list[dict], dict]:
    """A fidelity floor's pick under ``rule`` (module docstring): the chosen candidate, its attempt record and the
    record of every candidate measured (source, predictions, measured cosine, round) for the policy. ``ladders``:
    what it bisects (None: ``floor_ladders``, all of them; a study may pass a subset)."""
    c = calibration
    search = runs_on(c, c.trace, on_step, floor=budget.min_cosine)
    ran: dict[tuple, int] = {}  # images each candidate ran on: fewer than the search images for a certain miss

    def measure(x: Candidate) -> float:
        cosines = search(x)
        ran[policy_key(x)] = len(cosines)
        return float(cosines.mean())

    images = len(c.trace.reference)

    def stopped(tried: list[Tried]) -> list[Tried]:  # a certain miss records the images it ran
        return [t if ran[policy_key(t.candidate)] == images or t.listed.images_run is not None else
                Tried(replace(t.listed, images_run=ran[policy_key(t.candidate)]), t.round) for t in tried]

    ladders = floor_ladders(c, rule) if ladders is None else ladders
    chosen, tried = choose_floor(ladders, measure, budget.min_cosine)
    tried = stopped(tried)
    if chosen is None:
        raise unreachable(completed(tried, runs_on(c, c.trace, on_step), images), budget.min_cosine, c.baseline_ms,
                          c.r)
    how = "the fastest measuring at least the floor chosen"
    if c.confirm is not None:
        chosen, tried = confirmed_floor(ladders, tried, measure, runs_on(c, c.confirm, on_step), budget.min_cosine,
                                        images, len(c.confirm.reference))
        tried = stopped(tried)
        how = (f"the fastest of them run again on {len(c.confirm.reference)} confirm images; one missing the floor "
               "over both sets counts as a miss and the bisection resumes, until the fastest pass keeps it over both "
               f"(at most {CONFIRM_FINALISTS} confirm runs), chosen")
    attempts = [next(t for t in tried if t.candidate == chosen).listed.attempt()]
    record = {"choice": "measured: the candidates around the predicted floor, then bisection between each ladder's "
                        "measured passes and misses, run once each on the search images, fastest predicted first "
                        "(a miss stopped once its images so far left the floor out of reach: images_run); "
                        f"{how} (calibration.floor)",
              "candidates": [t.to_dict() | {"chosen": t.candidate == chosen} for t in tried]}
    return chosen, attempts, record
