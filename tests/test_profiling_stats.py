"""LatencyStats against hand-computed values (linear-interpolation percentiles)."""

import math

import pytest

from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.timing import LatencyStats


def test_stats_match_hand_computed_values() -> None:
    # 1, 2, 3, 4, 10 ms. Linear interpolation at rank q * (n - 1): p50 -> rank 2.0 -> 3;
    # p90 -> rank 3.6 -> 4 + 0.6 * (10 - 4) = 7.6; p99 -> rank 3.96 -> 4 + 0.96 * 6 = 9.76.
    stats = LatencyStats.from_samples([0.004, 0.001, 0.010, 0.002, 0.003], batch_size=8)
    assert stats.n == 5
    assert stats.p50_ms == pytest.approx(3.0)
    assert stats.p90_ms == pytest.approx(7.6)
    assert stats.p99_ms == pytest.approx(9.76)
    assert stats.mean_ms == pytest.approx(4.0)
    assert stats.std_ms == pytest.approx(math.sqrt((9 + 4 + 1 + 0 + 36) / 5))
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 10.0))
    assert stats.throughput_ips == pytest.approx(8 / 0.004)


def test_single_sample_is_every_percentile() -> None:
    stats = LatencyStats.from_samples([0.0025], batch_size=1)
    assert stats.p50_ms == stats.p99_ms == stats.min_ms == stats.max_ms == pytest.approx(2.5)
    assert stats.std_ms == 0.0


def test_to_dict_round_trips_fields() -> None:
    stats = LatencyStats.from_samples([0.001, 0.003], batch_size=2)
    as_dict = stats.to_dict()
    assert as_dict["mean_ms"] == pytest.approx(2.0)
    assert LatencyStats(**as_dict) == stats


@pytest.mark.parametrize(("samples", "batch"), [([], 1), ([0.001], 0), ([float("nan")], 1), ([-0.001], 1)])
def test_bad_input_is_rejected(samples: list[float], batch: int) -> None:
    with pytest.raises(ProfilerError):
        LatencyStats.from_samples(samples, batch_size=batch)
