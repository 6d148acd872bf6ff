"""The measured choice under a latency budget: the predictions shortlist, one forward per candidate decides.

The front is ranked by an additive prediction: the sum of damages measured with ONE block reducing and every token
present. In a policy a block receives fewer tokens (those before it removed some), and removing as many of fewer
tokens takes less similar pairs: on DINOv2-S/14 (12 Fashion-MNIST images) the front's 1.5x pick removed 32 tokens in
blocks 7-10 (of 169, 137, 105 and 73), whose single-block damages were 4e-7 to 1e-5 but which added 3e-4 to 7.5e-4
each in the policy (run block by block): 0.00176 in all against 0.00009 predicted, while uniform ToMe r=16, in the
same search space and as fast, measured 0.00093. So the prediction only shortlists, and one forward per candidate
on the search images chooses:

- the ``front_count`` front candidates that meet the budget with the least predicted damage (under the damage
  rule also the linearity rule's front's: its search space is inside the damage rule's);
- per mode assignment (``assignments``: ToMe, MLERP and prune everywhere and the rule's per-block modes under the
  damage rule; the paper's per-block modes under the linearity rule), the least-reducing *stepped* schedule that
  meets the budget: every block at one r choice ``a``, the first (or the last) j blocks at the next one ``b``
  (j = 0: uniform ``a``), as ``schedule.plan_tokens`` lets the blocks remove it. A uniform policy the budget allows
  is in this list, so the choice never measures worse than the uniform policies it could have picked by more than
  the standard error the rule below allows;
- the same ladders with the block next to the step filled in one token at a time (``"..., step filled in"``): the
  coarse rung within a budget can stop well short of it (DINOv2-S/14 at 1.8x: MLERP's first-stepped rung at 44.8 ms
  of 46.1, the one before it over); the filled rung asks no block for more tokens than the coarse one;
- the same ladders stepped one token at a time (``a`` and ``b = a + 1``, every count up to the largest choice): the
  r choices are r/2 apart, so the coarse rungs within a budget may stop well short of it. On DINOv2-S/14 at 1.5x
  (1000 held-out Fashion-MNIST images, ``bench/selection_images.py``) the coarse rungs were 0.00027-0.00041 of
  cosine behind uniform ToMe at their speed and the one-token rungs within 0.00017 of it (none ahead beyond its
  standard error: at 1.5x there, the one-token rungs bring the choice level with ToMe, not ahead).

Where the calibration has *confirm* images (``calibrate --confirm-images``, beyond the search and held-out ones),
the ``CONFIRM_FINALISTS`` candidates measuring highest on the search images are run on them too. The choice, on
the search images or over both sets (each image weighing the same), is the *fastest predicted* candidate whose mean
cosine is within one standard error of the highest (``within_noise``; the error of the paired, image-by-image
difference): candidates that close cannot be told apart on these images, and the faster one is worth having. 48
search images cannot separate candidates a few 1e-4 apart: on DINOv2-S/14 at 1.8x (``bench/selection_images.py``,
29 candidates, 1,000 held-out Fashion-MNIST images, ToMe at the same predicted speed) the highest on 48 random
images ended +0.00042 ahead of ToMe on average but behind in 22% of draws, on 256 images +0.00058 and behind in 2%
(``bench/results/selection_images_1p8x_intel/``). In another calibration there, with both coarse and filled rungs
listed, choosing the fastest within one error instead of the highest moved the mean held-out lead over ToMe from
+0.00081 to +0.00086 (48 + 192 images, 4 finalists, 500 draws; +0.00072 to +0.00098 on 48 images alone), the
choice 0.005x faster (``bench/results/selection_images_filled_1p8x/``). Held-out images never enter.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from tofu_export.calibration.damage import derive_damage, policy_cosines, policy_cosines_to_floor
from tofu_export.calibration.latency_model import BlockLatency
from tofu_export.calibration.select import Budget, Candidate, Damage, choose
from tofu_export.evaluation.metrics import paired_difference
from tofu_export.models.family import family_of
from tofu_export.schedule import plan_tokens

if TYPE_CHECKING:
    from tofu_export.calibration.state import Calibration
    from tofu_export.calibration.trace import Trace

FRONT_COUNT = 3
CONFIRM_FINALISTS = 4  # the candidates measuring highest on the search images that are run on the confirm images
SearchSpace = tuple[dict[str, list[str]], list[int], Damage, BlockLatency, int, int]  # stepped_ladders' arguments


@dataclass(frozen=True)
class Shortlisted:
    """One candidate of the measured choice: where it came from, its predictions, its measured cosine."""

    source: str  # "front #k" | "linearity front #k" | "<assignment> <first|last>-stepped"
    candidate: Candidate
    measured_cosine: float  # on the search images
    confirm_cosine: float | None = None  # on the confirm images, for the finalists (``confirmed_choice``)
    combined_cosine: float | None = None  # over both sets, each image weighing the same
    per_image: Tensor | None = field(default=None, compare=False, repr=False)  # [images] cosines behind the means
    images_run: int | None = None  # a floor's certain miss stopped after this many search images (``floor``)

    @classmethod
    def run(cls, source: str, candidate: Candidate, cosines: Tensor) -> Shortlisted:
        """The candidate measured on the search images: ``cosines [S]`` per image."""
        return cls(source, candidate, float(cosines.mean()), per_image=cosines)

    def confirmed(self, cosines: Tensor, searched: int, confirming: int) -> Shortlisted:
        """This candidate with its per-image ``cosines [C]`` on ``confirming`` confirm images: their mean, the mean
        over those and the ``searched`` search images (each image weighing the same) and both sets' per image."""
        cosine = float(cosines.mean())
        combined = (self.measured_cosine * searched + cosine * confirming) / (searched + confirming)
        both = None if self.per_image is None else torch.cat([self.per_image, cosines])
        return Shortlisted(self.source, self.candidate, self.measured_cosine, cosine, combined, both)

    def attempt(self) -> dict:
        """The chosen candidate's record in the policy's ``attempts``: its policy, predictions and measured cosines."""
        c = self.candidate
        return ({"modes": list(c.modes), "r": list(c.r), "predicted_cosine": 1.0 - c.damage,
                 "measured_cosine": self.measured_cosine, "predicted_ms": c.latency_ms}
                | ({} if self.confirm_cosine is None else {"confirm_cosine": self.confirm_cosine}))

    def to_dict(self) -> dict:
        c = self.candidate
        confirmed = {} if self.confirm_cosine is None else {"confirm_cosine": self.confirm_cosine,
                                                             "combined_cosine": self.combined_cosine}
        stopped = {} if self.images_run is None else {"images_run": self.images_run}
        return {"source": self.source, "modes": list(c.modes), "r": list(c.r), "predicted_damage": c.damage,
                "predicted_ms": c.latency_ms, "measured_cosine": self.measured_cosine, **stopped, **confirmed}


def stepped_schedules(choices: Sequence[int], depth: int, first: bool, between: bool = False) -> list[list[int]]:
    """Per-block r in order of more tokens asked for: for each pair of adjacent ``choices`` (ascending) ``a < b``,
    ``j = 0..depth-1`` blocks at ``b`` (the first j, or with ``first`` False the last j) and the rest at ``a``, then
    every block at the largest choice. With ``between``, the block next to step ``j`` also goes from ``a`` to ``b``
    one token at a time between two such schedules. ``[depth]`` each; the all-zero schedule is left out."""
    out = []
    for a, b in itertools.pairwise(sorted(set(choices))):
        for j in range(depth):
            for t in range(a, b if between else a + 1):  # the block next to the step: a, then a+1..b-1 between
                steps = [b] * j + [t] + [a] * (depth - j - 1)
                out.append(steps if first else steps[::-1])
    out.append([max(choices)] * depth)
    return [r for r in out if any(r)]


def predicted_damage(damage: Damage, modes: Sequence[str], r: Sequence[int]) -> float:
    """The additive prediction of ``(modes, r)`` (counts outside the table derived as ``damage.derive_damage``)."""
    total = 0.0
    for i, (mode, k) in enumerate(zip(modes, r, strict=True)):
        if k:
            table = damage[mode]
            total += table[k][i] if k in table else derive_damage(dict(table), k)[i]
    return total


def priced(modes: Sequence[str], asked: Sequence[int], damage: Damage, latency: BlockLatency, tokens0: int,
           num_prefix: int) -> Candidate:
    """The candidate running ``modes`` with ``asked [depth]`` tokens a block as ``plan_tokens`` clips them, with its
    predicted damage and latency."""
    r = plan_tokens(tokens0, num_prefix, asked, warn=False).r
    return Candidate(tuple(modes), tuple(r), predicted_damage(damage, modes, r),
                     latency.predict_ms(tokens0, num_prefix, r, modes))


def stepped_ladders(
    assignments: Mapping[str, Sequence[str]], choices: Sequence[int], damage: Damage, latency: BlockLatency,
    tokens0: int, num_prefix: int, between: bool = False,
) -> list[tuple[str, list[Candidate]]]:
    """Per mode assignment and step direction (``"<assignment> <first|last>-stepped"``), every stepped schedule in
    order of more tokens asked for (``stepped_schedules``, ``between`` as there), its r as ``plan_tokens`` clips it,
    with predictions."""
    out = []
    for (name, modes), first in itertools.product(assignments.items(), (True, False)):
        rungs = [priced(modes, asked, damage, latency, tokens0, num_prefix)
                 for asked in stepped_schedules(choices, len(modes), first, between)]
        out.append((f"{name} {'first' if first else 'last'}-stepped", rungs))
    return out


def stepped_candidates(
    assignments: Mapping[str, Sequence[str]], choices: Sequence[int], damage: Damage, latency: BlockLatency,
    tokens0: int, num_prefix: int, limit_ms: float, between: bool = False,
) -> list[tuple[str, Candidate]]:
    """Per mode assignment and step direction, the least-reducing stepped schedule predicted within ``limit_ms``
    (module docstring; ``between`` as ``stepped_schedules``), its r as ``plan_tokens`` clips it; none for an
    assignment no schedule brings within."""
    out = []
    for source, rungs in stepped_ladders(assignments, choices, damage, latency, tokens0, num_prefix, between):
        within = next((c for c in rungs if c.latency_ms <= limit_ms), None)
        if within is not None:
            out.append((source, within))
    return out


def one_token_steps(choices: Sequence[int]) -> list[int]:
    """Every count from 0 to the largest of ``choices``: the steps of a ladder stepped one token at a time."""
    return list(range(max(choices) + 1))


def budget_stepped(space: SearchSpace, limit_ms: float) -> list[tuple[str, Candidate]]:
    """The stepped candidates of the shortlist (module docstring) within ``limit_ms``: per mode assignment and step
    direction, the coarse ladder's (steps between the r choices), the same with the block at the step filled in one
    token at a time (``"<source>, step filled in"``) and the one-token ladder's (``"<source>, one-token steps"``)."""
    assignments, choices, *rest = space
    filled = stepped_candidates(*space, limit_ms, between=True)
    fine = stepped_candidates(assignments, one_token_steps(choices), *rest, limit_ms)
    return (stepped_candidates(*space, limit_ms) + [(f"{source}, step filled in", c) for source, c in filled]
            + [(f"{source}, one-token steps", c) for source, c in fine])


def policy_key(c: Candidate) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """What makes two candidates the same policy: the modes on the reducing blocks and the r."""
    return tuple(m if k else "-" for m, k in zip(c.modes, c.r, strict=True)), c.r


Listed = TypeVar("Listed", bound=tuple)  # (source, candidate, ...): a candidate listed with where it came from


def unique(listed: Sequence[Listed]) -> list[Listed]:
    """``listed`` (tuples whose second item is the candidate) without repeats of a policy (``policy_key``), the
    first kept."""
    seen, out = set(), []
    for item in listed:
        if policy_key(item[1]) not in seen:
            seen.add(policy_key(item[1]))
            out.append(item)
    return out


def shortlist(
    fronts: Mapping[str, Sequence[Candidate]], stepped: Sequence[tuple[str, Candidate]], limit_ms: float,
    front_count: int = FRONT_COUNT,
) -> list[tuple[str, Candidate]]:
    """Each front's (``{name: front}``) ``front_count`` least-damaging candidates within ``limit_ms``, then
    ``stepped``, without repeats (the same modes on the reducing blocks and the same r)."""
    listed = []
    for name, front in fronts.items():
        meeting = sorted((c for c in front if c.latency_ms <= limit_ms and any(c.r)), key=lambda c: c.damage)
        listed += [(f"{name} #{k}", c) for k, c in enumerate(meeting[:front_count])]
    return unique(listed + list(stepped))


def within_noise(per_image: Sequence[Tensor], latency_ms: Sequence[float]) -> int:
    """The one-standard-error rule: the index of the fastest predicted candidate whose mean cosine is within one
    standard error of its paired difference (``evaluation.metrics.paired_difference``: image by image,
    ``per_image[k] [B]``, the same images for all) of the highest mean (ties: the higher mean). With one image there
    is no spread: the highest mean (ties: the faster)."""
    means = [float(x.mean()) for x in per_image]
    best = max(range(len(means)), key=lambda k: (means[k], -latency_ms[k]))

    def near(k: int) -> bool:
        paired = paired_difference(per_image[k].tolist(), per_image[best].tolist())
        return paired["difference"] >= -(paired["standard_error"] or 0.0)

    return min((k for k in range(len(means)) if near(k)), key=lambda k: (latency_ms[k], -means[k]))


def choose_measured(listed: Sequence[tuple[str, Candidate]],
                    measure: Callable[[Candidate], Tensor]) -> tuple[Candidate, list[Shortlisted]]:
    """Measure every listed candidate (``measure``: one forward on the search images, the cosine per image) and
    return the one ``within_noise`` picks with every measurement."""
    measured = [Shortlisted.run(source, c, measure(c)) for source, c in listed]
    best = within_noise([s.per_image for s in measured], [s.candidate.latency_ms for s in measured])
    return measured[best].candidate, measured


def confirmed_choice(measured: Sequence[Shortlisted], confirm: Callable[[Candidate], Tensor], searched: int,
                     confirming: int, finalists: int = CONFIRM_FINALISTS) -> tuple[Candidate, list[Shortlisted]]:
    """The ``finalists`` of ``measured`` measuring highest on the ``searched`` search images, each run on the
    ``confirming`` confirm images (``confirm``: one forward there, the cosine per image); ``within_noise`` picks
    among them on both sets. Returns it and ``measured`` with the finalists' figures added."""
    ranked = sorted(measured, key=lambda s: (-s.measured_cosine, s.candidate.latency_ms))[:finalists]
    done = [s.confirmed(confirm(s.candidate), searched, confirming) for s in ranked]
    best = done[within_noise([s.per_image for s in done], [s.candidate.latency_ms for s in done])]
    finals = {id(s): d for s, d in zip(ranked, done, strict=True)}
    return best.candidate, [finals.get(id(s), s) for s in measured]


def runs_on(calibration: Calibration, images: Trace, on_step: Callable[[], None] | None = None,
            floor: float | None = None) -> Callable[[Candidate], Tensor]:
    """``measure(candidate)``: the candidate's cosine per image ``[B]`` on ``images`` (the search images' trace, or
    the confirm images'), one forward (``damage.policy_cosines``); ``on_step`` after each. With ``floor``, a
    candidate is stopped once its mean cannot reach it (``damage.policy_cosines_to_floor``: fewer than ``B``
    cosines, a certain miss), the images run hardest first: in the order of the last candidate run on all of them,
    lowest cosine first (an image that loses much under one policy loses much under the next), so that a miss is
    certain sooner; the order changes no mean."""
    c = calibration
    hardest_first: Tensor | None = None  # [B] image indices

    def measure(x: Candidate) -> Tensor:
        nonlocal hardest_first
        if floor is None:
            cosine = policy_cosines(c.model, images, x.modes, x.r, c.prop_attn).detach()
        else:
            order = torch.arange(len(images.reference)) if hardest_first is None else hardest_first
            cosine = policy_cosines_to_floor(c.model, images, x.modes, x.r, c.prop_attn, floor, order=order).detach()
            if len(cosine) == len(order):  # ran on every image: back to the traced order, and the next order
                cosine = cosine.new_empty(len(order)).index_copy_(0, order, cosine)
                hardest_first = cosine.argsort()
        if on_step is not None:
            on_step()
        return cosine

    return measure


def measured_choice(calibration: Calibration, budget: Budget, rule: str,
                    on_step: Callable[[], None] | None = None) -> tuple[Candidate, list[dict], dict]:
    """A latency ``budget``'s pick under ``rule`` (module docstring): the chosen candidate, its attempt record and
    the shortlist's record (every candidate's source, predictions and measured cosine) for the policy. ``on_step``
    after each candidate measured."""
    c = calibration
    choose(c.fronts[rule], budget, c.baseline_ms)  # an unreachable budget: the error naming the fastest policy
    limit = budget.max_latency_ms if budget.max_latency_ms is not None else c.baseline_ms / budget.speedup
    stepped = budget_stepped(search_space(c, rule), limit)

    chosen, measured = choose_measured(shortlist(rule_fronts(c, rule), stepped, limit), runs_on(c, c.trace, on_step))
    how = "each shortlisted candidate run once on the search images"
    if c.confirm is not None:
        chosen, measured = confirmed_choice(measured, runs_on(c, c.confirm, on_step), len(c.trace.reference),
                                            len(c.confirm.reference))
        how += f", the {CONFIRM_FINALISTS} highest also on {len(c.confirm.reference)} confirm images"
    how += (", the fastest predicted whose mean cosine is within one paired standard error of the highest chosen "
            "(shortlist.within_noise)")
    attempts = [next(s for s in measured if s.candidate == chosen).attempt()]
    record = {"choice": f"measured: {how} (calibration.shortlist)",
              "candidates": [s.to_dict() | {"chosen": s.candidate == chosen} for s in measured]}
    return chosen, attempts, record


def rule_fronts(calibration: Calibration, rule: str) -> dict[str, list[Candidate]]:
    """The fronts a rule shortlists from: its own; under the damage rule also the linearity rule's (inside it)."""
    fronts = calibration.fronts
    return {"front": fronts[rule]} | ({"linearity front": fronts["linearity"]} if rule == "damage" else {})


def search_space(calibration: Calibration, rule: str) -> SearchSpace:
    """The stepped schedules' ingredients under ``rule``: the mode assignments (module docstring), the r choices,
    the scaled damage table, the latency model, the tokens entering block 0 and the protected prefix."""
    c, family = calibration, family_of(calibration.model)
    modes = c.rule_modes()
    depth = len(modes[rule])
    assignments = ({"tome": ["mean"] * depth, "mlerp": ["mlerp"] * depth, "prune": ["prune"] * depth,
                    "damage-rule modes": modes["damage"]} if rule == "damage" else
                   {"linearity-rule modes": modes["linearity"]})
    scaled = c.scaled_damage()
    choices = sorted({k for by_r in scaled.values() for k in by_r} | {0})
    return assignments, choices, scaled, c.latency, family.num_tokens(c.model), family.num_prefix(c.model)
