"""Parse ONNX Runtime's built-in profiler output (Chrome-trace JSON) into per-node mean times."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tofu_export.engines.base import OpTime, RunnerError

_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class OrtProfile:
    """Per-node mean kernel times, the per-run time ORT recorded for the same runs (``model_run``), and,
    when the caller timed the runs itself, their host wall-clock times."""

    ops: list[OpTime]
    run_ms: list[float]
    wall_ms: list[float] = field(default_factory=list)


def parse_ort_profile(events: Sequence[dict[str, Any]], *, skip_runs: int = 0) -> OrtProfile:
    """Group ``cat == "Node"`` kernel events by the ``model_run`` they fall in, drop the first ``skip_runs``
    runs (warm-up), and average each node's ``dur`` (µs) over the remaining runs, in milliseconds.

    A node that ran several times in one run (e.g. inside a loop) is summed within the run.
    Ops are returned in first-execution order.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    kept = runs[skip_runs:]
    if not kept:
        raise RunnerError(
            f"The ORT profile has {len(runs)} 'model_run' events; need more than skip_runs={skip_runs}. "
            "Run the session at least once more with profiling enabled."
        )
    starts = [start for start, _ in kept]
    totals_us: dict[str, float] = {}
    op_types: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(_KERNEL_SUFFIX):
            continue
        index = bisect.bisect_right(starts, event["ts"]) - 1
        if index < 0 or event["ts"] > kept[index][1]:
            continue  # belongs to a skipped warm-up run
        name = event["name"][: -len(_KERNEL_SUFFIX)]
        totals_us[name] = totals_us.get(name, 0.0) + float(event["dur"])
        op_types.setdefault(name, str(event.get("args", {}).get("op_name", "")))
    ops = [OpTime(name=n, op_type=op_types[n], ms=us / 1e3 / len(kept)) for n, us in totals_us.items()]
    return OrtProfile(ops=ops, run_ms=[(end - start) / 1e3 for start, end in kept])
