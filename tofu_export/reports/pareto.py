"""Speed/accuracy trade-off points and their Pareto front (lower latency, higher accuracy)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tofu_export.profiling.errors import ProfilerError


@dataclass(frozen=True)
class TradeoffPoint:
    """One exported variant: reduction ``mode`` (e.g. "tofu", "tome", "none"), rate ``r``, its latency and
    optional accuracy (any scale, higher is better)."""

    mode: str
    r: int
    latency_ms: float
    accuracy: float | None = None

    @classmethod
    def coerce(cls, point: TradeoffPoint | Mapping[str, Any] | Any) -> TradeoffPoint:
        """Accept a TradeoffPoint, a mapping, or an object with ``mode``, ``r``, ``latency_ms`` attributes."""
        if isinstance(point, TradeoffPoint):
            return point
        values = {key: _field(point, key) for key in ("mode", "r", "latency_ms", "accuracy")}
        missing = [key for key in ("mode", "r", "latency_ms") if values[key] is None]
        if missing:
            raise ProfilerError(
                f"Trade-off point {point!r} lacks {', '.join(missing)}; each point needs mode, r and "
                "latency_ms (accuracy is optional)."
            )
        accuracy = values["accuracy"]
        return cls(
            mode=str(values["mode"]),
            r=int(values["r"]),
            latency_ms=float(values["latency_ms"]),
            accuracy=None if accuracy is None else float(accuracy),
        )


def _field(point: Mapping[str, Any] | Any, key: str) -> Any:
    return point.get(key) if isinstance(point, Mapping) else getattr(point, key, None)


def pareto_front(points: Iterable[TradeoffPoint | Mapping[str, Any] | Any]) -> list[TradeoffPoint]:
    """Points with an accuracy that no other point beats on both axes, sorted by latency (ascending).

    ``q`` dominates ``p`` when ``q`` is no slower and no less accurate, and strictly better on one axis.
    Points without an accuracy cannot be ranked and are left out; exact duplicates are all kept.
    """
    ranked = [p for p in map(TradeoffPoint.coerce, points) if p.accuracy is not None]

    def dominates(q: TradeoffPoint, p: TradeoffPoint) -> bool:
        no_worse = q.latency_ms <= p.latency_ms and q.accuracy >= p.accuracy  # type: ignore[operator]
        return no_worse and (q.latency_ms < p.latency_ms or q.accuracy > p.accuracy)  # type: ignore[operator]

    front = [p for p in ranked if not any(dominates(q, p) for q in ranked)]
    return sorted(front, key=lambda p: (p.latency_ms, -p.accuracy))  # type: ignore[operator]
