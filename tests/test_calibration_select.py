"""r per block from several values, the linearity rule, derived damage and ToMe at matched latency: checked on
synthetic measurements (no model, no calibration run), so each case takes milliseconds."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tofu_export.calibration.damage import derive_damage
from tofu_export.calibration.latency_model import NONE, BlockLatency
from tofu_export.calibration.linearity import linearity_modes
from tofu_export.calibration.measured import at_speedup, tome_bracket
from tofu_export.calibration.select import Budget, BudgetError, choose, pareto_front, r_choices
from tofu_export.errors import UserError
from tofu_export.profiling.timing import clock_threads
from tofu_export.schedule import max_reduction, plan_tokens

TOKENS, PREFIX, R = 33, 1, 4  # 32 matchable tokens: blocks can remove 2, 4, 6 or 8


def _latency() -> BlockLatency:
    tokens = [9, 17, 33]
    none = [n * 0.1 for n in tokens]
    modes = {"prune": [v - 0.02 for v in none], "mean": [v + 0.01 for v in none], "mlerp": [v + 0.02 for v in none]}
    unsized = [n * 0.097 for n in tokens]  # proportional attention's mask: 0.003 ms a token
    return BlockLatency(R, tokens, {NONE: none, **modes}, {}, 0.5, 10, "test", [0.06, 0.06, 0.06], unsized)


def _damage(depth: int = 3) -> dict[str, dict[int, list[float]]]:
    base = {"prune": [0.010, 0.004, 0.002], "mean": [0.002, 0.003, 0.0005], "mlerp": [0.003, 0.001, 0.0004]}
    return {m: {k: [v * (k / R) ** 1.5 for v in values[:depth]] for k in r_choices(R) if k}
            for m, values in base.items()}


def test_r_choices_are_half_steps_of_r() -> None:
    assert r_choices(16) == (0, 8, 16, 24, 32)
    assert r_choices(5) == (0, 3, 5, 8, 10)
    assert r_choices(1) == (0, 1, 2)


def test_latency_prices_a_smaller_r_by_the_mlp_tokens_it_keeps() -> None:
    latency = _latency()
    assert latency.block("prune", 33) == latency.block("prune", 33, R)
    assert latency.block("prune", 33, 2) == pytest.approx(latency.block("prune", 33) + 2 * 0.06)
    assert latency.block("prune", 33, 8) == pytest.approx(latency.block("prune", 33) - 4 * 0.06)
    assert latency.block(NONE, 33, 0) == latency.block(NONE, 33)


def test_blocks_no_merge_reached_yet_are_priced_without_proportional_attentions_mask() -> None:
    """Token sizes, and with them the mask, exist only after a block merged (pruning leaves none): the unreduced
    model is priced at the unsized block, and so is every block of a policy before its first merge."""
    latency = _latency()
    assert latency.block(NONE, 33) - latency.block(NONE, 33, sized=False) == pytest.approx(0.099)
    mask = {n: 0.003 * n for n in (33, 29, 25)}  # the tokens blocks 0, 1, 2 receive when each removes R

    def cost(mode: str, n: int) -> float:
        return latency.block(mode, n)

    assert latency.predict_ms(TOKENS, PREFIX, [0] * 3, ["mean"] * 3) == pytest.approx(0.5 + 3 * (3.3 - 0.099))
    tome = 0.5 + cost("mean", 33) - mask[33] + cost("mean", 29) + cost("mean", 25)  # sizes from block 1 on
    assert latency.predict_ms(TOKENS, PREFIX, [R] * 3, ["mean"] * 3) == pytest.approx(tome)
    prune = 0.5 + sum(cost("prune", n) - mask[n] for n in (33, 29, 25))  # pruning leaves no sizes
    assert latency.predict_ms(TOKENS, PREFIX, [R] * 3, ["prune"] * 3) == pytest.approx(prune)
    mixed = 0.5 + cost("prune", 33) - mask[33] + cost("mlerp", 29) - mask[29] + cost("mean", 25)
    assert latency.predict_ms(TOKENS, PREFIX, [R] * 3, ["prune", "mlerp", "mean"]) == pytest.approx(mixed)
    unmeasured = dataclasses.replace(latency, unsized_ms=[])  # a latency model from before the unsized block
    assert unmeasured.predict_ms(TOKENS, PREFIX, [0] * 3, ["mean"] * 3) == pytest.approx(0.5 + 3 * 3.3)


def _brute_force(damage, latency, modes_allowed=None) -> list[tuple[float, float]]:
    """Every (modes, r) policy scored, then the Pareto set: what the dynamic program must return."""
    depth = 3
    options = []
    for i in range(depth):
        allowed = list(damage) if modes_allowed is None else modes_allowed[i]
        options.append([(None, 0)] + [(m, k) for m in allowed for k in damage[m]])
    points = []
    for combo in itertools.product(*options):
        r = [k for _, k in combo]
        plan = plan_tokens(TOKENS, PREFIX, r, warn=False)
        if plan.clipped:
            continue
        d = sum(damage[m][k][i] for i, (m, k) in enumerate(combo) if k)
        ms = latency.predict_ms(TOKENS, PREFIX, r, [m or "mean" for m, _ in combo])
        points.append((d, ms))
    return _pareto(points)


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (damage, ms) points no other beats on both, ties within 1e-9 (float sums in another order) merged."""
    front, best = [], float("inf")
    for d, ms in sorted(points):
        if ms < best - 1e-9:
            front.append((d, ms))
            best = ms
    return front


@pytest.mark.parametrize("rule", ["damage", "linearity"])
def test_the_front_over_per_block_r_is_the_exact_pareto_set(rule: str) -> None:
    damage, latency = _damage(), _latency()
    allowed = None if rule == "damage" else [["prune"], ["mlerp"], ["mlerp"]]
    front = pareto_front(damage, latency, TOKENS, PREFIX, allowed)
    got = _pareto([(c.damage, c.latency_ms) for c in front])
    want = _brute_force(damage, latency, allowed)
    assert len(got) == len(want) and [v for p in got for v in p] == pytest.approx([v for p in want for v in p])
    assert {k for c in front for k in c.r} - {0, R} and front[-1].r[0] == 2 * R  # other r than 0 and r are used
    for c in front:
        assert not plan_tokens(TOKENS, PREFIX, c.r, warn=False).clipped
        assert all(k in r_choices(R) for k in c.r)
        if allowed is not None:
            assert all(m == a[0] for m, k, a in zip(c.modes, c.r, allowed, strict=True) if k)


def test_the_budget_picks_on_the_per_block_front_and_an_unreachable_one_names_the_fastest() -> None:
    front = pareto_front(_damage(), _latency(), TOKENS, PREFIX)
    baseline = _latency().predict_ms(TOKENS, PREFIX, [0, 0, 0], ["mean"] * 3)
    pick = choose(front, Budget(speedup=1.2), baseline)
    assert pick.latency_ms <= baseline / 1.2
    assert all(c.damage >= pick.damage for c in front if c.latency_ms <= baseline / 1.2)
    fastest = front[-1]
    with pytest.raises(BudgetError, match=rf"fastest one at r={max(fastest.r)} is predicted"):
        choose(front, Budget(speedup=10.0), baseline)


def test_derived_damage_recovers_a_power_law_and_is_at_most_linear_below_the_measured() -> None:
    measured = {4: [0.01, 0.0, 0.002], 8: [0.01 * 2**1.7, 0.0, 0.003]}  # block 2 grows slower than linearly
    derived = derive_damage(measured, 6)
    assert derived[0] == pytest.approx(0.01 * 1.5**1.7)  # interpolated on the fitted power law
    assert derived[1] == 0.0
    assert derived[2] == pytest.approx(0.002 * 1.5)  # exponent clamped at 1: never below the straight line
    assert derive_damage(measured, 2)[0] == pytest.approx(0.01 * 0.5**1.7)  # below r: towards d(0) = 0


def test_linearity_rule_prunes_where_the_block_is_non_linear() -> None:
    linearity = [torch.full((4, 3), v) for v in (0.2, 0.06, 0.01)]
    assert linearity_modes(linearity) == ["prune", "prune", "mlerp"]
    assert linearity_modes(linearity, threshold=0.1) == ["prune", "mlerp", "mlerp"]


def test_tome_is_bracketed_around_the_policys_latency_and_interpolated_at_its_speedup() -> None:
    predict = lambda k: 100.0 - 3.0 * k  # noqa: E731  ToMe's predicted ms at uniform r=k
    assert tome_bracket(predict, 70.0, limit=16, width=4) == (8, 10, 12)  # nearest r=10, and the middle timed too
    assert tome_bracket(predict, 99.0, limit=16, width=4) == (1, 3, 5)  # clamped at r >= 1
    assert tome_bracket(predict, 40.0, limit=16, width=4) == (12, 14, 16)  # clamped at the limit
    assert tome_bracket(predict, 70.0, limit=16, width=2) == (9, 10, 11)
    assert tome_bracket(predict, 99.0, limit=1, width=2) == (1,)  # a model that can remove one token a block
    assert at_speedup([1.4, 1.6], [0.999, 0.997], 1.5) == (pytest.approx(0.998), False)
    value, extrapolated = at_speedup([1.4, 1.6], [0.999, 0.997], 1.7)
    assert value == pytest.approx(0.996) and extrapolated
    # Three points of a concave curve: the value between the two nearest, not on the line between the ends
    speedups, cosines = [1.6, 1.4, 1.5], [0.997, 0.999, 0.9985]  # measured order need not be the r order
    assert at_speedup(speedups, cosines, 1.45) == (pytest.approx(0.99875), False)
    assert at_speedup(speedups, cosines, 1.55) == (pytest.approx(0.99775), False)
    assert at_speedup(speedups, cosines, 1.3) == (pytest.approx(0.9995), True)  # the end segment's line, beyond
    assert at_speedup(speedups, cosines, 1.7) == (pytest.approx(0.9955), True)


def test_the_thread_cpu_clock_times_one_thread() -> None:
    assert clock_threads("thread-cpu", None) == 1 and clock_threads("wall", 4) == 4
    with pytest.raises(UserError, match="one intra-op thread"):
        clock_threads("thread-cpu", 2)
    with pytest.raises(UserError, match="unknown clock"):
        clock_threads("sundial", None)


def test_the_search_never_asks_a_block_for_more_than_it_can_remove() -> None:
    damage = {m: {k: [0.001] * 6 for k in r_choices(8) if k} for m in ("prune", "mlerp")}
    latency = BlockLatency(8, [5, 33], {NONE: [0.5, 3.3], "prune": [0.4, 3.0], "mlerp": [0.45, 3.1]}, {}, 0.5, 10, "t")
    for c in pareto_front(damage, latency, TOKENS, PREFIX):
        plan = plan_tokens(TOKENS, PREFIX, c.r, warn=False)
        assert not plan.clipped and all(k <= max_reduction(n, PREFIX) for n, k in zip(plan.tokens, c.r, strict=True))


def test_damage_by_r_measures_a_subset_at_the_largest_r_and_derives_the_rest(monkeypatch) -> None:
    from tofu_export.calibration import damage as damage_module

    scale = {"prune": 10.0, "mean": 1.0, "mlerp": 2.0}
    growth = [1.5, 2.0]  # per-block exponent: the same for every mode (the pairs removed are the same)
    truth = lambda i, m, k: 1e-3 * scale[m] * (i + 1) * (k / 4) ** growth[i]  # noqa: E731
    calls = []

    def fake_block(model, trace, i, mode, removed, prop_attn):
        calls.append((i, mode, removed))
        return truth(i, mode, removed)

    def fake_single(model, trace, r, *, modes, prop_attn, on_step):
        for _ in range(2 * len(modes)):
            on_step()
        return {m: [truth(i, m, r) for i in range(2)] for m in modes}

    monkeypatch.setattr(damage_module, "block_damage", fake_block)
    monkeypatch.setattr(damage_module, "single_block_damage", fake_single)
    steps, totals = [], []
    table = damage_module.damage_by_r(None, None, r_choices(4), 4, also=["prune", "mean"],
                                      on_step=lambda: steps.append(len(calls)), on_total=totals.append)
    assert sorted(calls) == [(0, "mean", 8), (0, "prune", 8), (1, "mean", 8)]  # least damaging + the rule's
    assert totals == [2 * 3 + 3] and len(steps) == totals[0]  # the progress total, exact once it is known
    for m in scale:
        for i in range(2):
            assert table[m][8][i] == pytest.approx(truth(i, m, 8))  # the block's exponent carries to other modes
            assert table[m][6][i] == pytest.approx(truth(i, m, 6))  # in between: on the power law
            assert table[m][2][i] == pytest.approx(truth(i, m, 2))


def test_damage_by_r_measures_the_rules_mode_at_the_largest_r_only_where_it_is_the_other_kind(monkeypatch) -> None:
    """Mean and MLERP fold the same pairs: at 2r the linearity rule's mode is measured where it prunes and the least
    damaging mode merges (or the other way round), not where both merge; a derived mode takes the growth of a
    measured mode of its own kind (pruning's damage grows another way than the merges')."""
    from tofu_export.calibration import damage as damage_module

    scale = [{"prune": 1.0, "mean": 3.0, "mlerp": 2.0},  # block 0: pruning damages least
             {"prune": 10.0, "mean": 1.0, "mlerp": 1.2}, {"prune": 10.0, "mean": 1.0, "mlerp": 1.2}]
    growth = {"prune": 3.0, "mean": 1.5, "mlerp": 1.5}  # per kind
    truth = lambda i, m, k: 1e-3 * scale[i][m] * (k / 4) ** growth[m]  # noqa: E731
    calls = []

    def fake_block(model, trace, i, mode, removed, prop_attn):
        calls.append((i, mode, removed))
        return truth(i, mode, removed)

    def fake_single(model, trace, r, *, modes, prop_attn, on_step):
        return {m: [truth(i, m, r) for i in range(3)] for m in modes}

    monkeypatch.setattr(damage_module, "block_damage", fake_block)
    monkeypatch.setattr(damage_module, "single_block_damage", fake_single)
    also = ["mlerp", "prune", "mlerp"]  # the linearity rule's modes
    table = damage_module.damage_by_r(None, None, r_choices(4), 4, also=also)
    assert sorted(calls) == [(0, "mlerp", 8), (0, "prune", 8), (1, "mean", 8), (1, "prune", 8), (2, "mean", 8)]
    for i in range(3):
        for m in growth:
            if (i, m) == (2, "prune"):  # no pruning measured in block 2: it grows as the block's merges do
                assert table[m][8][i] == pytest.approx(truth(i, m, 4) * 2 ** growth["mean"])
            else:  # block 0's mean grows as its MLERP, not as the less damaging pruning
                assert table[m][8][i] == pytest.approx(truth(i, m, 8)), (i, m)
    calls.clear()
    damage_module.damage_by_r(None, None, r_choices(4), 4, also=also, also_same_kind=True)  # as before: any mode
    assert (2, "mlerp", 8) in calls and len(calls) == 6
