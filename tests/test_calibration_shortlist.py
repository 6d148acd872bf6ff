"""The measured choice under a latency budget (``calibration.shortlist``), on synthetic fronts and measurements:
the additive prediction only shortlists, a forward per candidate decides, and a uniform policy the budget allows
is always among the measured."""

from __future__ import annotations

import itertools

import pytest
import torch
from synthetic_calibration import block_latency, late_blocks_look_free

from tofu_export.calibration.latency_model import BlockLatency
from tofu_export.calibration.select import Candidate, pareto_front, r_choices
from tofu_export.calibration.shortlist import (
    Shortlisted,
    budget_stepped,
    choose_measured,
    confirmed_choice,
    predicted_damage,
    shortlist,
    stepped_candidates,
    stepped_schedules,
    within_noise,
)
from tofu_export.schedule import plan_tokens

TOKENS, PREFIX, R, DEPTH = 33, 1, 4, 3


def _latency() -> BlockLatency:
    return block_latency([9, 17, 33], R)


def _damage() -> dict[str, dict[int, list[float]]]:
    return late_blocks_look_free(R)


def _images(cosine: float, count: int) -> torch.Tensor:
    """``[count]`` per-image cosines, all ``cosine``."""
    return torch.full((count,), cosine, dtype=torch.float64)


def _baseline() -> float:
    return _latency().predict_ms(TOKENS, PREFIX, [0] * DEPTH, ["mean"] * DEPTH)


def test_stepped_schedules_walk_from_uniform_to_uniform_one_block_at_a_time() -> None:
    first = stepped_schedules([0, 2, 4], 3, first=True)
    assert first[:4] == [[2, 0, 0], [2, 2, 0], [2, 2, 2], [4, 2, 2]]  # the all-zero schedule is left out
    assert first[-1] == [4, 4, 4] and len(first) == 6
    last = stepped_schedules([0, 2, 4], 3, first=False)
    assert last[:3] == [[0, 0, 2], [0, 2, 2], [2, 2, 2]] and last[-1] == [4, 4, 4]
    assert all(sum(a) <= sum(b) for a, b in itertools.pairwise(first))  # more tokens asked, step by step


@pytest.mark.parametrize("first", [True, False])
def test_filled_in_steps_go_one_token_at_a_time_through_the_coarse_rungs(first: bool) -> None:
    coarse = stepped_schedules([0, 2, 4], 3, first=first)
    filled = stepped_schedules([0, 2, 4], 3, first=first, between=True)
    assert [r for r in filled if r in coarse] == coarse  # every coarse rung, in order
    assert filled[0] == ([1, 0, 0] if first else [0, 0, 1]) and filled[-1] == [4, 4, 4]
    for a, b in itertools.pairwise(filled):  # one block, one token more
        assert [y - x for x, y in zip(a, b, strict=True) if y != x] == [1]
    assert filled[filled.index([2, 2, 0] if first else [0, 2, 2]) + 1] == ([2, 2, 1] if first else [1, 2, 2])


def test_stepped_candidates_are_the_least_reducing_within_the_budget() -> None:
    latency, damage = _latency(), _damage()
    limit = _baseline() / 1.3
    found = stepped_candidates({"tome": ["mean"] * DEPTH}, r_choices(R), damage, latency, TOKENS, PREFIX, limit)
    assert [source for source, _ in found] == ["tome first-stepped", "tome last-stepped"]
    for source, c in found:
        assert c.latency_ms <= limit and c.modes == ("mean",) * DEPTH
        assert c.damage == pytest.approx(predicted_damage(damage, c.modes, c.r))
        schedules = stepped_schedules(r_choices(R), DEPTH, source.endswith("first-stepped"))
        before = schedules[schedules.index(list(c.r)) - 1]  # the step before asks less and misses the budget
        assert latency.predict_ms(TOKENS, PREFIX, plan_tokens(TOKENS, PREFIX, before, warn=False).r,
                                  c.modes) > limit
    nothing = stepped_candidates({"tome": ["mean"] * DEPTH}, r_choices(R), damage, latency, TOKENS, PREFIX, 0.1)
    assert nothing == []


def test_the_budget_lists_the_ladders_stepped_one_token_at_a_time_too() -> None:
    """The r choices are r/2 apart: the shortlist also takes each ladder stepped one token at a time, its
    least-reducing rung within the budget, named as such."""
    latency, damage = _latency(), _damage()
    limit = _baseline() / 1.3
    space = ({"tome": ["mean"] * DEPTH}, r_choices(R), damage, latency, TOKENS, PREFIX)
    found = budget_stepped(space, limit)
    assert [source for source, _ in found] == ["tome first-stepped", "tome last-stepped",
                                               "tome first-stepped, step filled in",
                                               "tome last-stepped, step filled in",
                                               "tome first-stepped, one-token steps",
                                               "tome last-stepped, one-token steps"]
    assert found[:2] == stepped_candidates(*space, limit)
    assert [c for _, c in found[2:4]] == [c for _, c in stepped_candidates(*space, limit, between=True)]
    pairs = list(zip(found[2:4], found[:2], strict=True))
    for (_, filled), (_, coarse) in pairs:
        assert filled.latency_ms <= limit and filled.damage <= coarse.damage
        assert all(x <= y for x, y in zip(filled.r, coarse.r, strict=True))
    assert any(filled.r != coarse.r for (_, filled), (_, coarse) in pairs)  # here last-stepped: (6, 7, 8), not 8
    for source, c in found[4:]:
        assert c.latency_ms <= limit and c.damage == pytest.approx(predicted_damage(damage, c.modes, c.r))
        schedules = stepped_schedules(list(range(2 * R + 1)), DEPTH, "first-stepped" in source)
        assert any(k % 2 for k in c.r)  # a count between the r choices (0, 2, 4, 6, 8)
        before = schedules[schedules.index(list(c.r)) - 1]  # one token fewer somewhere, and over the budget
        assert sum(c.r) - sum(before) == 1
        assert latency.predict_ms(TOKENS, PREFIX, plan_tokens(TOKENS, PREFIX, before, warn=False).r,
                                  c.modes) > limit
    assert budget_stepped(space, 0.1) == []


def test_the_largest_schedule_is_clipped_to_what_the_blocks_can_remove() -> None:
    latency = _latency()
    found = stepped_candidates({"prune": ["prune"] * DEPTH}, r_choices(R), _damage(), latency, TOKENS, PREFIX,
                               latency.predict_ms(TOKENS, PREFIX, plan_tokens(TOKENS, PREFIX, [8] * 3).r,
                                                  ["prune"] * 3) + 1e-9)
    assert found and all(not plan_tokens(TOKENS, PREFIX, c.r, warn=False).clipped for _, c in found)


def test_shortlist_takes_the_nearest_front_candidates_then_the_stepped_without_repeats() -> None:
    front = [Candidate(("mean",) * 3, (0, 0, 0), 0.0, 10.0), Candidate(("mean",) * 3, (0, 0, 4), 0.001, 9.5),
             Candidate(("mlerp",) * 3, (0, 4, 4), 0.002, 9.0), Candidate(("mean",) * 3, (4, 4, 4), 0.003, 8.5),
             Candidate(("prune",) * 3, (8, 4, 4), 0.01, 8.0)]
    stepped = [("tome first-stepped", Candidate(("mean",) * 3, (4, 4, 4), 0.003, 8.5)),  # = front #1: dropped
               ("tome last-stepped", Candidate(("mean",) * 3, (0, 4, 8), 0.004, 8.8))]
    listed = shortlist({"front": front}, stepped, limit_ms=9.2, front_count=2)
    assert [s for s, _ in listed] == ["front #0", "front #1", "tome last-stepped"]
    assert [c.r for _, c in listed[:2]] == [(0, 4, 4), (4, 4, 4)]  # the least damaging within 9.2 ms first
    # a block that removes nothing names a mode that does not matter: the same policy, listed once
    same = Candidate(("prune", "mlerp", "mlerp"), (0, 4, 4), 0.002, 9.0)
    assert len(shortlist({"front": front}, [("x", same)], limit_ms=9.2, front_count=2)) == 2
    both = shortlist({"front": front, "other": front[3:4]}, [], limit_ms=9.2, front_count=2)
    assert [s for s, _ in both] == ["front #0", "front #1"]  # the other front's one is a repeat


def test_a_front_pick_that_measures_worse_than_uniform_tome_loses_to_it() -> None:
    """The additive prediction ranks a late-heavy policy first; measured, uniform ToMe in the same budget is
    better, and the measured choice takes ToMe."""
    latency, damage = _latency(), _damage()
    limit = _baseline() / 1.3
    front = pareto_front(damage, latency, TOKENS, PREFIX)
    stepped = stepped_candidates({"tome": ["mean"] * DEPTH}, r_choices(R), damage, latency, TOKENS, PREFIX, limit)
    listed = shortlist({"front": front}, stepped, limit)
    predicted_first = listed[0][1]
    tome = next(c for s, c in listed if s.startswith("tome"))
    assert predicted_first.damage < tome.damage  # the prediction prefers the front's candidate

    def measure(c: Candidate) -> float:  # in a policy a block receives fewer tokens: removing k of them costs more
        tokens = plan_tokens(TOKENS, PREFIX, c.r, warn=False).tokens
        context = sum((k / (n - PREFIX)) ** 2 for k, n in zip(c.r[1:], tokens[1:], strict=True))
        return 1.0 - c.damage - 0.1 * context

    assert measure(tome) > measure(predicted_first)
    chosen, measured = choose_measured(listed, lambda c: torch.tensor([measure(c)], dtype=torch.float64))  # 1 image
    assert chosen == max(listed, key=lambda x: measure(x[1]))[1] and chosen != predicted_first
    assert measure(chosen) >= measure(tome)
    assert [m.measured_cosine for m in measured] == [measure(c) for _, c in listed]
    record = measured[0].to_dict()
    assert set(record) == {"source", "modes", "r", "predicted_damage", "predicted_ms", "measured_cosine"}


def test_a_measured_tie_goes_to_the_faster_candidate() -> None:
    slow, fast = Candidate(("mean",) * 3, (4, 4, 0), 0.001, 9.0), Candidate(("mean",) * 3, (4, 4, 4), 0.002, 8.0)
    chosen, _ = choose_measured([("a", slow), ("b", fast)], lambda c: _images(0.999, 4))
    assert chosen == fast


def test_the_fastest_within_one_paired_standard_error_of_the_best_is_chosen() -> None:
    """b measures highest; c is 0.0004 lower on average but image by image within one standard error of b: c, the
    faster, wins. d is as fast as c but clearly lower; e is faster still but further than its error."""
    base = torch.tensor([0.990, 0.995, 0.985, 0.998, 0.992, 0.989], dtype=torch.float64)
    b = base + 0.0010
    c = base + 0.0006 + torch.tensor([0.0016, -0.0016, 0.0012, -0.0012, 0.0008, -0.0008], dtype=torch.float64)
    d, e = base, base + 0.0002
    latency = [9.0, 8.0, 7.0, 7.0, 6.0]
    means = [float(x.mean()) for x in (base, b, c, d, e)]
    error = float((c - b).std() / 6 ** 0.5)
    assert means[1] - error <= means[2] < means[1] and means[4] < means[1] - float((e - b).std() / 6 ** 0.5)
    assert within_noise([base, b, c, d, e], latency) == 2
    assert within_noise([b, c], [9.0, 8.0]) == 1  # c within b's noise and faster
    assert within_noise([b, base + 0.0006], [9.0, 8.0]) == 0  # the same 0.0004 lower on every image: no noise
    assert within_noise([b[-1:], c[-1:]], [9.0, 8.0]) == 0  # one image: no spread, the highest (b)


def test_the_finalists_run_on_the_confirm_images_and_the_best_mean_over_both_wins() -> None:
    """48 search images rank a first; on 192 confirm images b holds better: b wins on the mean over all 240. Only
    the finalists run there (e would have won, but measured fifth on the search images)."""
    a, b, c, d, e = (Candidate(("mean",) * 3, (k, k, 0), 0.001, 9.0 - k) for k in range(5))
    searched = {a: 0.9990, b: 0.9989, c: 0.9970, d: 0.9985, e: 0.9980}
    measured = [Shortlisted.run(k, x, _images(searched[x], 48)) for k, x in zip("abcde", (a, b, c, d, e), strict=True)]
    confirm = {a: 0.9980, b: 0.9992, d: 0.9986, e: 0.9999}
    calls: list[Candidate] = []
    chosen, out = confirmed_choice(measured, lambda x: calls.append(x) or _images(confirm[x], 192), 48, 192,
                                   finalists=3)
    assert calls == [a, b, d] and chosen == b
    assert [s.confirm_cosine for s in out] == [pytest.approx(0.9980), pytest.approx(0.9992), None,
                                               pytest.approx(0.9986), None]
    assert out[1].combined_cosine == pytest.approx((0.9989 * 48 + 0.9992 * 192) / 240)
    assert out[2] is measured[2]  # not a finalist: as measured
    assert {"confirm_cosine", "combined_cosine"} <= set(out[0].to_dict())
    assert "confirm_cosine" not in out[2].to_dict() and out[1].per_image.shape == (240,)
    tied = [Shortlisted.run("slow", a, _images(0.999, 48)), Shortlisted.run("fast", e, _images(0.999, 48))]
    assert confirmed_choice(tied, lambda x: _images(0.998, 192), 48, 192)[0] == e  # a tie: the faster
    noisy = torch.tensor([0.001, -0.001] * 120)  # the faster e within one standard error over both sets: e
    near = [Shortlisted.run("a", a, 0.9990 + noisy[:48]), Shortlisted.run("e", e, 0.9989 + noisy[:48].flip(0))]
    confirms = {a: 0.9990 + noisy[48:], e: 0.9989 + noisy[48:].flip(0)}
    assert confirmed_choice(near, confirms.__getitem__, 48, 192)[0] == e
