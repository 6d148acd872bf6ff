"""time_callable with a scripted clock: warm-up, synchronization order, iteration and time budgets."""

from collections.abc import Sequence

import pytest

from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.timing import QUARTILES, per_round_speedup, time_callable


class ScriptedClock:
    """Returns the scripted times in order, logging each read."""

    def __init__(self, times: Sequence[float], log: list[str]) -> None:
        self._times = list(times)
        self._log = log

    def __call__(self) -> float:
        self._log.append("clock")
        return self._times.pop(0)


def test_warmup_discarded_and_sync_brackets_each_clock_read() -> None:
    log: list[str] = []
    clock = ScriptedClock([0.0, 1.0, 1.0, 3.0, 3.0, 6.0], log)
    samples = time_callable(
        lambda: log.append("fn"),
        warmup=2,
        iters=3,
        budget_s=None,
        sync=lambda: log.append("sync"),
        clock=clock,
    )
    assert samples == [1.0, 2.0, 3.0]
    assert log[:2] == ["fn", "fn"]  # warm-up: untimed, unsynchronized
    assert log[2:] == ["sync", "clock", "fn", "sync", "clock"] * 3


def test_budget_stops_once_spent() -> None:
    clock = ScriptedClock([0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0], [])
    samples = time_callable(lambda: None, warmup=0, iters=None, budget_s=2.5, clock=clock)
    assert samples == [1.0, 1.0, 1.0]


def test_budget_respects_min_iters() -> None:
    clock = ScriptedClock([0.0, 10.0, 10.0, 20.0, 20.0, 30.0, 30.0, 40.0], [])
    samples = time_callable(lambda: None, warmup=0, iters=None, budget_s=0.5, clock=clock, min_iters=3)
    assert samples == [10.0, 10.0, 10.0]


def test_iters_cap_wins_over_unspent_budget() -> None:
    clock = ScriptedClock([0.0, 0.1, 0.1, 0.2, 0.2, 0.3], [])
    assert len(time_callable(lambda: None, warmup=0, iters=2, budget_s=100.0, clock=clock)) == 2


def test_real_clock_measures_work() -> None:
    samples = time_callable(lambda: sum(range(20_000)), warmup=1, iters=5, budget_s=None)
    assert len(samples) == 5 and all(s > 0 for s in samples)


@pytest.mark.parametrize(
    ("warmup", "iters", "budget_s"), [(0, None, None), (-1, 5, None), (0, 0, None), (0, None, 0.0)]
)
def test_bad_stopping_rules_are_rejected(warmup: int, iters: int | None, budget_s: float | None) -> None:
    with pytest.raises(ProfilerError):
        time_callable(lambda: None, warmup=warmup, iters=iters, budget_s=budget_s)


def test_per_round_speedup_is_the_median_of_ratios_with_the_asked_spread() -> None:
    """Rounds of very different speed: the ratio of the medians (20 / 20 = 1.0 here) is not what most rounds say;
    the speed-up is the median of the per-round ratios (2.0), its spread their percentiles (linear)."""
    baseline, other = [1.0, 10.0, 100.0, 20.0, 30.0], [0.5, 20.0, 50.0, 10.0, 30.0]  # ratios 2, 0.5, 2, 2, 1
    assert per_round_speedup(baseline, other) == pytest.approx((0.7, 2.0, 2.0))  # 10th, 50th, 90th
    assert per_round_speedup(baseline, other, QUARTILES) == pytest.approx((1.0, 2.0, 2.0))
    assert per_round_speedup([3.0], [2.0], QUARTILES) == (1.5, 1.5, 1.5)  # one round: that ratio thrice
