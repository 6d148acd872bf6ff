"""The measured choice under a fidelity floor (``calibration.floor``), on synthetic ladders, fronts and
measurements: the fastest candidate that *measures* at least the floor is chosen, not the one predicted to; after
the prediction's guess each ladder is bisected between its measured passes and misses; a floor nothing measured
meets is an error naming the best measured; every candidate measured is recorded; a certain miss stops early and
changes no decision. No calibration is run: the forwards are replaced by a function of the policy."""

from __future__ import annotations

import math

import pytest
import torch
from synthetic_calibration import block_latency, late_blocks_look_free

from tofu_export.calibration import floor as floor_module
from tofu_export.calibration import shortlist as shortlist_module
from tofu_export.calibration.damage import out_of_reach
from tofu_export.calibration.floor import (
    around_floor,
    choose_floor,
    floor_shortlist,
    forward_bound,
    next_rung,
)
from tofu_export.calibration.latency_model import BlockLatency
from tofu_export.calibration.search import choose_policy
from tofu_export.calibration.select import Budget, BudgetError, Candidate, choose, pareto_front
from tofu_export.calibration.shortlist import policy_key, predicted_damage
from tofu_export.calibration.state import Calibration
from tofu_export.calibration.trace import Trace
from tofu_export.schedule import plan_tokens

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENS, PREFIX, R, DEPTH = 17, 1, 4, 3  # vit_tiny at 64 px: 16 patches and the class token
IMAGES = 6  # the search images the synthetic forwards measure
SPREAD = torch.tensor([0.4, -1.0, 1.0, -0.2, 0.2, -0.4], dtype=torch.float64)  # per image, times the policy's loss


def _ladder(count: int = 8) -> list[Candidate]:
    """A front-like ladder: rung i predicted at damage 1e-4 * 2**i, 10 - i ms."""
    return [Candidate(("mean",) * 3, (i, i, i), 1e-4 * 2**i, 10.0 - i) for i in range(count)]


def _counting(cosine):
    calls = []

    def measure(c: Candidate) -> float:
        calls.append(c)
        return cosine(c)

    return measure, calls


def test_around_floor_takes_the_rungs_nearest_the_predicted_floor_on_both_sides() -> None:
    rungs = _ladder()
    assert around_floor(rungs, 0.002, 2) == [3, 4, 5, 6]  # 0.0008, 0.0016 | 0.0032, 0.0064
    assert around_floor(rungs, 1e-5, 2) == [0, 1]  # nothing predicted to pass: the least damaging
    assert around_floor(rungs, 1.0, 1) == [7]  # everything predicted to pass: the most reducing
    listed = floor_shortlist([("a", rungs, 1), ("b", rungs[2:], 1), ("c", rungs[:3], 2)], 0.002)
    assert [c.latency_ms for _, c in listed] == [5.0, 6.0, 8.0, 9.0]  # fastest first, a policy listed once
    assert [s for s, _ in listed] == ["a #5", "a #4", "c #2", "c #1"]  # b's #3 and #2 are a's #5 and #4


def test_a_ladder_lists_the_rung_midway_through_its_measured_bracket() -> None:
    rungs = _ladder(16)  # rung i: 10 - i ms
    tried = {}

    def run(i: int, cosine: float) -> None:
        tried[policy_key(rungs[i])] = floor_module.Tried(floor_module.Shortlisted("x", rungs[i], cosine), 0)

    run(15, 0.5)
    assert next_rung(rungs, tried, 0.99, math.inf) == 7  # nothing passed: between reducing nothing and the miss
    run(7, 0.995)
    assert next_rung(rungs, tried, 0.99, math.inf) == 11  # between the pass and the miss
    run(12, 0.98)
    assert next_rung(rungs, tried, 0.99, math.inf) == 9
    assert next_rung(rungs, tried, 0.99, 0.5) == 10  # a faster pass elsewhere (0.5 ms): rungs 0-9 cannot win
    run(8, 0.992), run(9, 0.991), run(10, 0.97), run(11, 0.96)
    assert next_rung(rungs, tried, 0.99, math.inf) is None  # pass at 9, miss at 10: the bracket holds no rung
    assert next_rung(rungs, tried, 0.99, -1.0) is None  # every rung slower than a pass


def test_a_pessimistic_prediction_lets_a_faster_policy_than_predicted_be_chosen() -> None:
    """Damage measures an eighth of the prediction: the predicted pick (6 ms) keeps the floor with room, the round's
    fastest passes, the scale falls and the next round finds the fastest rung that passes (3 ms)."""
    rungs = _ladder()
    predicted = choose(rungs, Budget(min_cosine=0.998), baseline_ms=11.0)
    measure, calls = _counting(lambda c: 1.0 - c.damage / 8)
    chosen, tried = choose_floor([("front", rungs, 2)], measure, 0.998)
    assert predicted.latency_ms == 6.0 and chosen.latency_ms == 3.0 and chosen != predicted
    assert [t.candidate.latency_ms for t in tried] == [4.0, 3.0] == [c.latency_ms for c in calls]
    assert [t.round for t in tried] == [0, 1]  # the bracket past the pass at 4 ms holds one rung


def test_an_optimistic_prediction_is_bisected_until_a_policy_measures_the_floor() -> None:
    """Damage measures ten times the prediction: nothing around the predicted floor passes, and bisection between
    reducing nothing and the least reducing miss finds the fastest rung that passes."""
    rungs = _ladder()
    predicted = choose(rungs, Budget(min_cosine=0.998), baseline_ms=11.0)
    measure, calls = _counting(lambda c: 1.0 - 10 * c.damage)
    chosen, tried = choose_floor([("front", rungs, 2)], measure, 0.998)
    assert 1.0 - 10 * predicted.damage < 0.998  # the predicted pick misses the floor
    assert chosen == rungs[1] and 1.0 - 10 * chosen.damage >= 0.998  # the fastest rung that measures it
    assert all(1.0 - 10 * c.damage < 0.998 for c in calls if c.latency_ms < chosen.latency_ms)
    assert len(calls) == len({policy_key(c) for c in calls}) == 6  # each policy run once
    assert [rungs.index(c) for c in calls] == [6, 5, 4, 3, 1, 2] and [t.round for t in tried] == [0, 0, 0, 0, 1, 2]


def test_a_ladder_whose_most_reducing_rung_misses_far_is_bisected_not_abandoned() -> None:
    """What a DINOv2-S/14 calibration met: uniform ToMe's stepped ladder, every rung predicted to keep the floor,
    listed only its most reducing rung, which measured 0.74; rescaling by that miss (88x) sent the ladder to rungs
    slower than the front's pass, and the choice stayed 1.5x where ToMe itself kept the floor at 1.7x. Bisection
    finds the ladder's fastest pass."""
    stepped = [Candidate(("mean",) * 3, (i, i, i), 1e-5 * i, 60.0 - i) for i in range(48)]  # 12-59 ms
    front = [Candidate(("mlerp",) * 3, (1, 1, 1), 0.004, 50.0), Candidate(("prune",) * 3, (2, 2, 2), 0.006, 49.0)]

    def cosine(c: Candidate) -> float:
        if c in front:
            return 0.996 if c == front[0] else 0.99
        return 0.74 if c.r[0] == 47 else 1.0 - 1e-4 * c.r[0] ** 2 / 4  # stepped: passes up to rung 14 (46 ms)

    measure, calls = _counting(cosine)
    chosen, tried = choose_floor([("front", front, 2), ("tome", stepped, 1)], measure, 0.995)
    assert chosen == stepped[14] and cosine(stepped[15]) < 0.995 <= cosine(stepped[14])
    assert calls[:3] == [stepped[47], front[1], front[0]]  # round 0: the prediction's guesses
    ladders = [("front", front, 2), ("tome", stepped, 1)]
    assert [t.candidate for t in tried] == calls and len(calls) <= forward_bound(ladders, 0.005) == 3 + 2 + 6


def test_a_ladder_of_hundreds_of_rungs_is_bisected_to_its_fastest_pass_however_many_rounds_it_takes() -> None:
    """A ladder stepped one token at a time on a 12-block ViT has hundreds of rungs, and a round whose first
    listing passes skips the slower listings of other ladders. A fixed count of rounds (8, as before) stopped
    bisecting this ladder three rungs short of its fastest pass; the search now runs until every bracket is closed,
    within ``forward_bound``."""
    long = [Candidate(("mlerp",) * 3, (i, i, i), 1e-6 * i, 500.0 - i) for i in range(400)]  # 500 -> 101 ms

    def cosine(c: Candidate) -> float:
        return 0.999 if c.r[0] <= 297 else 0.99  # the prediction is pessimistic: the floor is crossed at rung 297

    measure, calls = _counting(cosine)
    chosen, tried = choose_floor([("front", long, 2)], measure, 0.995)
    assert chosen == long[297] and cosine(long[298]) < 0.995  # the bracket closed on the fastest pass
    assert max(t.round for t in tried) >= 8  # more rounds than the fixed count allowed
    early = [t for t in tried if t.round < 8]
    assert max((t.candidate for t in early if t.cosine >= 0.995), key=lambda c: c.r[0]) == long[294]  # 8 rounds
    assert len(calls) == len({policy_key(c) for c in calls}) <= forward_bound([("front", long, 2)], 0.005)


def test_a_round_stops_at_the_first_pass_and_a_measured_tie_goes_to_the_higher_cosine() -> None:
    a, b = Candidate(("mean",) * 3, (4, 4, 4), 0.001, 8.0), Candidate(("mlerp",) * 3, (4, 4, 4), 0.0012, 8.0)
    slow = Candidate(("mean",) * 3, (4, 4, 0), 0.0005, 9.0)
    fast = Candidate(("prune",) * 3, (8, 8, 8), 0.01, 6.0)
    cosines = {a: 0.9985, b: 0.9990, slow: 0.9995, fast: 0.99}
    measure, calls = _counting(cosines.__getitem__)
    chosen, tried = choose_floor([("x", [slow, a, fast], 2), ("y", [b], 1)], measure, 0.998)
    assert [t.listed.source for t in tried] == ["x #2", "x #1", "y #0"]
    assert chosen == b and slow not in calls  # the tie at 8 ms: both run, the higher cosine wins; 9 ms never runs
    assert calls[0] == fast and set(calls) == {fast, a, b}


# ---------------------------------------------------------------------------------------------------------------
# Through ``Calibration.policy``: a synthetic calibration of a tiny ViT, ``verify`` replaced
# ---------------------------------------------------------------------------------------------------------------


def _latency() -> BlockLatency:
    return block_latency([9, 13, 17], R)


def _damage() -> dict[str, dict[int, list[float]]]:
    return late_blocks_look_free(R)


def _in_context(modes, r) -> float:
    """A policy's 'measured' cosine: a block receiving fewer tokens pays more for removing as many (the additive
    prediction's blind spot)."""
    tokens = plan_tokens(TOKENS, PREFIX, list(r), warn=False).tokens
    context = sum((k / (n - PREFIX)) ** 2 for k, n in zip(r[1:], tokens[1:], strict=True))
    return 1.0 - predicted_damage(_damage(), modes, r) - 0.1 * context


@pytest.fixture(scope="module")
def calibration(make_vit) -> Calibration:
    model = make_vit("vit_tiny_patch16_224", depth=DEPTH, img_size=64, num_classes=0)
    latency, damage = _latency(), _damage()
    tr = Trace([], torch.zeros(IMAGES, 192), [torch.full((2, R), 0.01)] * DEPTH)
    baseline = latency.predict_ms(TOKENS, PREFIX, [0] * DEPTH, ["mean"] * DEPTH)
    uniform = {m: {"compounding": 1.0} for m in damage}
    fronts = {"damage": pareto_front(damage, latency, TOKENS, PREFIX),
              "linearity": pareto_front(damage, latency, TOKENS, PREFIX, [["mlerp"]] * DEPTH)}
    return Calibration(model, tr, R, damage, latency, uniform, fronts, baseline, True, {"images": {"count": 0}},
                       measured_r=(4, 8))


class Runs(list):
    """Every forward's ``(modes, r)``; ``complete``: those run on every image (not stopped at the floor);
    ``orders``: the image order each stopping forward was given."""

    complete: list[tuple]
    orders: list[list[int]]


def _per_image(modes, r) -> torch.Tensor:
    """A policy's cosine on each of the ``IMAGES`` search images ``[IMAGES]``, a spread with mean ``_in_context``
    and none above 1."""
    mean = _in_context(modes, r)
    return mean + SPREAD * min(1e-4, 1.0 - mean)


@pytest.fixture()
def runs(monkeypatch) -> Runs:
    calls = Runs()
    calls.complete, calls.orders = [], []

    def policy_cosines(model, tr, modes, r, prop_attn) -> torch.Tensor:
        calls.append((tuple(modes), tuple(r)))
        calls.complete.append((tuple(modes), tuple(r)))
        return _per_image(modes, r)

    def policy_cosines_to_floor(model, tr, modes, r, prop_attn, floor, order) -> torch.Tensor:
        calls.append((tuple(modes), tuple(r)))
        calls.orders.append(order.tolist())
        cosines = _per_image(modes, r)[order]
        run = next((k for k in range(1, IMAGES + 1) if out_of_reach(cosines[:k], IMAGES, floor)), IMAGES)
        if run == IMAGES:
            calls.complete.append((tuple(modes), tuple(r)))
        return cosines[:run]

    monkeypatch.setattr(shortlist_module, "policy_cosines", policy_cosines)  # every forward (shortlist.runs_on)
    monkeypatch.setattr(shortlist_module, "policy_cosines_to_floor", policy_cosines_to_floor)
    return calls


def test_the_policy_is_the_fastest_that_measures_the_floor_and_every_candidate_is_recorded(calibration, runs):
    budget = Budget(min_cosine=0.996)
    predicted = choose(calibration.front, budget, calibration.baseline_ms)
    assert _in_context(predicted.modes, predicted.r) < 0.996  # the predicted pick misses the floor when run
    policy = choose_policy(calibration, budget, measure_latency=False)
    m = policy.measurements
    assert m["choice"].startswith("measured") and "measured_latency" not in m
    candidates = m["candidates"]
    assert len(candidates) == len(runs) and {(tuple(c["modes"]), tuple(c["r"])) for c in candidates} == set(runs)
    keys = {"source", "modes", "r", "predicted_damage", "predicted_ms", "measured_cosine", "round", "chosen"}
    order_of = dict(zip(runs, runs.orders, strict=True))  # the image order each candidate ran in
    for c in candidates:
        cosines = _per_image(c["modes"], c["r"])[order_of[(tuple(c["modes"]), tuple(c["r"]))]]
        run = c.get("images_run", IMAGES)  # a certain miss stopped early: the mean of the images it ran
        assert set(c) == keys | ({"images_run"} if run < IMAGES else set())
        assert c["measured_cosine"] == pytest.approx(float(cosines[:run].mean()))
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and (chosen[0]["modes"], chosen[0]["r"]) == (list(policy.modes), list(policy.r))
    assert m["measured_cosine"] == chosen[0]["measured_cosine"] >= 0.996 and m["predicted_ms"] == policy_ms(policy)
    passing = [c for c in candidates if c["measured_cosine"] >= 0.996]
    assert chosen[0]["predicted_ms"] == min(c["predicted_ms"] for c in passing)  # the fastest measured to pass
    assert (list(policy.modes), list(policy.r)) != (list(predicted.modes), list(predicted.r))
    assert {c["round"] for c in candidates} == set(range(max(c["round"] for c in candidates) + 1))
    assert max(c["round"] for c in candidates) >= 1  # bisection went on after the prediction's guess
    assert m["held_out_cosine"] is None and m["held_out_images"] == 0  # the search images only


def policy_ms(policy) -> float:
    return _latency().predict_ms(TOKENS, PREFIX, list(policy.r), list(policy.modes))


def test_the_linearity_rule_measures_only_the_papers_modes(calibration, runs) -> None:
    policy = choose_policy(calibration, Budget(min_cosine=0.996), measure_latency=False, rule="linearity")
    assert all(mode == "mlerp" for modes, r in runs for mode, k in zip(modes, r, strict=True) if k)
    assert policy.measurements["rule"] == "linearity" and policy.measurements["measured_cosine"] >= 0.996


def test_a_floor_nothing_measured_meets_is_an_error_naming_the_best_measured(calibration, runs) -> None:
    with pytest.raises(BudgetError, match=r"no policy measured keeps min_cosine=0\.9999: the best of \d+ run on "
                                          r"the search images measures 0\.99") as caught:
        choose_policy(calibration, Budget(min_cosine=0.9999), measure_latency=False)
    best = max(_in_context(modes, r) for modes, r in runs)
    assert f"measures {best:.5f} (" in str(caught.value) and caught.value.exit_code == 2
    hint = caught.value.hint
    assert hint.option == "min_cosine" and float(hint.value) <= best < float(hint.value) + 1e-4
    assert hint.alternative.option == "r" and hint.alternative.value == "2"
    ladders = floor_module.floor_ladders(calibration, "damage")
    assert len(set(runs)) <= forward_bound(ladders, 1 - 0.9999)  # the bound of the module docstring
    searched = len(set(runs))  # each candidate once in the search
    completed = len(runs) - searched  # stopped misses run again on every image, so the best named is exact
    stopped = searched - (len(runs.complete) - completed)
    assert 0 < completed < stopped  # only those that could still be the best


def test_a_miss_stops_once_the_floor_is_out_of_reach_and_no_decision_changes(calibration, runs, monkeypatch):
    """The same search with every candidate run on every image measures the same candidates in the same rounds and
    chooses the same policy; a stopped miss ran fewer images and its recorded mean is below the floor too."""
    budget = Budget(min_cosine=0.996)
    chosen, attempts, record = floor_module.floor_choice(calibration, budget, "damage")
    stopped = [c for c in record["candidates"] if "images_run" in c]
    assert stopped and all(c["images_run"] < IMAGES and c["measured_cosine"] < 0.996 for c in stopped)
    assert len(runs) == len(record["candidates"]) > len(runs.complete)
    monkeypatch.setattr(shortlist_module, "policy_cosines_to_floor",
                        lambda model, tr, modes, r, prop_attn, floor, order: _per_image(modes, r)[order])
    again, attempts_again, record_again = floor_module.floor_choice(calibration, budget, "damage")
    assert again == chosen and attempts_again == attempts
    key = ("source", "modes", "r", "round", "chosen")
    assert [[c[k] for k in key] for c in record_again["candidates"]] == [[c[k] for k in key]
                                                                         for c in record["candidates"]]
    assert not any("images_run" in c for c in record_again["candidates"])


def test_the_images_run_hardest_first_once_a_candidate_ran_on_all_of_them(calibration, runs) -> None:
    """Until a candidate runs on every search image they run as traced; after it, lowest cosine first in its
    run (here the same for every policy: ``SPREAD``'s order)."""
    floor_module.floor_choice(calibration, Budget(min_cosine=0.996), "damage")
    first_complete = next(i for i, call in enumerate(runs) if call in runs.complete)
    assert runs.orders[: first_complete + 1] == [list(range(IMAGES))] * (first_complete + 1)
    hardest_first = SPREAD.argsort().tolist()  # [1, 5, 3, 4, 0, 2]
    assert runs.orders[first_complete + 1:] and all(o == hardest_first for o in runs.orders[first_complete + 1:])


def test_the_floor_bisects_only_the_ladders_it_is_given(calibration, runs) -> None:
    """``floor_choice(..., ladders=...)``: a study passes a subset (``bench/floor_ladders.py``) instead of swapping
    the module's ``floor_ladders``; every candidate measured comes from those ladders."""
    ladders = [x for x in floor_module.floor_ladders(calibration, "damage") if x[0] == "tome first-stepped"]
    chosen, _, record = floor_module.floor_choice(calibration, Budget(min_cosine=0.996), "damage", ladders=ladders)
    rungs = {policy_key(c) for c in ladders[0][1]}
    assert runs and {policy_key(Candidate(modes, r, 0.0, 0.0)) for modes, r in runs} <= rungs
    assert all(c["source"].startswith("tome first-stepped #") for c in record["candidates"])
    assert policy_key(chosen) in rungs and _in_context(chosen.modes, chosen.r) >= 0.996


def test_ladders_stepped_one_token_at_a_time_reach_closer_to_the_floor(calibration) -> None:
    """The r choices are r/2 apart, so the coarse rungs can stop short of the floor: with the same ladders stepped
    one token at a time every floor's pick is as fast or faster, and floors no coarse rung keeps are met."""
    ladders = floor_module.floor_ladders(calibration, "damage")
    fine = [ladder for ladder in ladders if ladder[0].endswith(", one-token steps")]
    assert {name for name, _, _ in fine} == {f"{a} {d}-stepped, one-token steps" for d in ("first", "last")
                                             for a in ("tome", "mlerp", "prune", "damage-rule modes")}
    coarse = [ladder for ladder in ladders if ladder not in fine]

    def measure(c: Candidate) -> float:
        return _in_context(c.modes, c.r)

    only_fine = []
    for floor in (0.9997, 0.9995, 0.9991, 0.985):
        with_fine, _ = choose_floor(ladders, measure, floor)
        without, _ = choose_floor(coarse, measure, floor)
        assert with_fine is not None and measure(with_fine) >= floor, floor
        assert without is None or with_fine.latency_ms <= without.latency_ms, floor
        only_fine.append(without is None)
    assert only_fine == [True, True, False, False]  # r=4: one token in block 0 keeps 0.9995, two do not


def test_a_rung_slower_than_a_pass_is_left_out_where_it_stands() -> None:
    """A ladder's latency need not fall at every rung (a block that starts reducing pays for its matching first):
    the rungs before a slow one stay in the bracket when they are faster than the pass."""
    latency = [5.6, 5.7, 5.9, 5.6, 5.4, 5.2]  # rung 2 slower than the pass at 5.8 ms, rungs 0-1 faster
    rungs = [Candidate(("mean",) * 3, (i, 0, 0), 1e-4 * i, ms) for i, ms in enumerate(latency)]
    miss = floor_module.Tried(floor_module.Shortlisted("x", rungs[3], 0.99), 0)
    assert next_rung(rungs, {policy_key(rungs[3]): miss}, 0.995, 5.8) == 0  # of rungs 0 and 1: the first
    assert next_rung(rungs, {policy_key(rungs[3]): miss}, 0.995, 5.65) == 0
    assert next_rung(rungs, {policy_key(rungs[3]): miss}, 0.995, 5.5) is None


def test_the_fastest_passes_run_on_the_confirm_images_until_one_keeps_the_floor_over_both() -> None:
    """Three candidates keep 0.998 on 48 search images; on 192 confirm images the fastest falls below it over both
    sets and the next one keeps it: that one is chosen, the slowest never runs there. None keeping it: the one
    closest to it."""
    fast, mid, slow, miss = (Candidate(("mean",) * 3, (k, k, 0), 0.001, ms) for k, ms in
                             ((6, 6.0), (5, 7.0), (4, 8.0), (8, 5.0)))
    tried = [floor_module.Tried(floor_module.Shortlisted(name, c, cosine), 0) for name, c, cosine in
             (("slow", slow, 0.9990), ("fast", fast, 0.9981), ("miss", miss, 0.9970), ("mid", mid, 0.9984))]
    confirm = {fast: 0.9975, mid: 0.9981, slow: 0.9999}
    calls: list[Candidate] = []
    chosen, out = floor_module.confirmed_floor([], tried, pytest.fail, lambda c: calls.append(c) or torch.tensor(
        [confirm[c]] * 192, dtype=torch.float64), 0.998, 48, 192)  # no ladder: nothing to resume
    assert calls == [fast, mid] and chosen == mid
    assert out[3].listed.combined_cosine == pytest.approx((0.9984 * 48 + 0.9981 * 192) / 240)
    assert out[0] is tried[0] and out[3].round == 0 and "confirm_cosine" in out[1].to_dict()
    low = {fast: 0.9970, mid: 0.9975, slow: 0.9970}
    chosen, out = floor_module.confirmed_floor([], tried, pytest.fail, lambda c: torch.tensor([low[c]],
                                                                                              dtype=torch.float64),
                                               0.998, 48, 192)
    assert all(t.listed.combined_cosine < 0.998 for t in out if t.listed.combined_cosine is not None)
    assert chosen == mid  # nothing keeps 0.998 over both: the highest mean over both (0.99768)


def test_a_pass_the_confirm_images_reject_reopens_the_bisection_above_the_next_pass() -> None:
    """Rung 5 is the fastest pass on the search images (rung 4, slower, was never run) and misses the floor over
    both sets: it counts as a miss, the bisection resumes below it and finds rung 4, which keeps the floor over both
    and is chosen. Confirming only the search's own passes chose rung 5, below the floor over both."""
    rungs = _ladder()
    ladders = [("front", rungs, 2)]
    measure, calls = _counting(lambda c: 1.0 - 4e-4 * c.r[0])
    chosen, tried = choose_floor(ladders, measure, 0.998)
    assert chosen == rungs[5] and [t.candidate for t in tried] == [rungs[6], rungs[5]]
    confirm_cosine, confirmed = {rungs[5]: 0.9970, rungs[4]: 0.9985}, []

    def confirm(c: Candidate) -> torch.Tensor:
        confirmed.append(c)
        return torch.full((192,), confirm_cosine[c], dtype=torch.float64)

    chosen, out = floor_module.confirmed_floor(ladders, tried, measure, confirm, 0.998, 48, 192)
    assert chosen == rungs[4] and confirmed == [rungs[5], rungs[4]]
    assert [c.r[0] for c in calls] == [6, 5, 2, 3, 4]  # each run once on the search images
    record = {t.candidate.r[0]: t for t in out}
    assert record[5].listed.combined_cosine < 0.998 <= record[4].listed.combined_cosine
    assert [record[k].round for k in (6, 5, 2, 3, 4)] == [0, 0, 1, 2, 3]  # the resumed rounds numbered on
    never = {rungs[5]: 0.9970, rungs[4]: 0.9970, rungs[3]: 0.9970, rungs[2]: 0.9975, rungs[1]: 0.9999}
    confirm_cosine, confirmed = never, []
    chosen, out = floor_module.confirmed_floor(ladders, tried, measure, confirm, 0.998, 48, 192, finalists=4)
    assert confirmed == [rungs[5], rungs[4], rungs[3], rungs[2]]  # at most four confirm runs, fastest pass first
    assert chosen == rungs[2]  # none keeps it: the highest mean over both
