"""Resumable sweep over (mode, r): export, profile and optionally evaluate each point, saving after each one.

The state file maps a content key (mode, r, config) to the finished record, so an interrupted sweep resumes
where it stopped and a sweep with a different ``config_key`` (checkpoint, image size, ...) starts afresh.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tofu_export.atomic import write_json_atomic
from tofu_export.errors import UserError
from tofu_export.progress import tracker

STATE_VERSION = 1
BASELINE = "baseline"  # the mode of a sweep's shared r = 0 point


class SweepError(UserError, RuntimeError):
    """A sweep point failed, or the sweep state file cannot be used."""


@dataclass(frozen=True)
class SweepPoint:
    """One variant to build: token-reduction ``mode`` ("tofu", "tome", ..., "baseline", "policy") and rate ``r``."""

    mode: str
    r: int


def point_key(point: SweepPoint, config_key: str) -> str:
    """Stable content hash of the point and the configuration it is built with."""
    payload = json.dumps({"mode": point.mode, "r": point.r, "config": config_key}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def run_sweep(
    points: Sequence[SweepPoint],
    *,
    state_path: str | Path,
    export_fn: Callable[[SweepPoint], Path],
    profile_fn: Callable[[Path], dict[str, Any]],
    eval_fn: Callable[[Path], dict[str, Any]] | None = None,
    config_key: str = "",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every point not already finished in ``state_path``; return one record per point, in order.

    A record is ``{"key", "mode", "r", "config_key", "artifact", "profile", "eval"}``. ``export_fn`` should
    cache its artifacts by key so a resumed point whose export finished is not rebuilt. A failing point
    raises ``SweepError`` after every earlier point has been saved.
    """
    state_path = Path(state_path)
    state = load_state(state_path)
    records = []
    with tracker("sweep", len(points), enabled=progress) as bar:
        for point in points:
            key = point_key(point, config_key)
            bar.status(f"{point.mode} r={point.r}")
            if key not in state["points"]:
                state["points"][key] = _run_point(point, key, config_key, export_fn, profile_fn, eval_fn)
                write_json_atomic(state_path, state)
            records.append(state["points"][key])
            bar.advance()
    return records


def load_state(state_path: Path) -> dict[str, Any]:
    """The saved sweep state, or an empty one when the file does not exist yet."""
    if not state_path.exists():
        return {"version": STATE_VERSION, "points": {}}
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"Cannot read sweep state {state_path} ({exc}); delete it to start the sweep over.") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "points" not in state:
        raise SweepError(
            f"{state_path} is not a version-{STATE_VERSION} sweep state file; delete it (or sweep into another "
            "folder) to start the sweep over."
        )
    points = state["points"]
    bad = next((key for key, record in points.items() if not _is_record(record)), None) \
        if isinstance(points, dict) else "points"
    if bad is not None:
        raise SweepError(f"{state_path} is damaged (its entry {str(bad)[:40]!r} is not a finished point record); "
                         "delete it to start the sweep over (the exported artifacts are reused).")
    return state


def _is_record(record: Any) -> bool:
    """A finished point as ``_run_point`` writes it."""
    return (isinstance(record, dict) and isinstance(record.get("mode"), str) and isinstance(record.get("r"), int)
            and isinstance(record.get("artifact"), str) and isinstance(record.get("profile"), dict))


def _run_point(
    point: SweepPoint,
    key: str,
    config_key: str,
    export_fn: Callable[[SweepPoint], Path],
    profile_fn: Callable[[Path], dict[str, Any]],
    eval_fn: Callable[[Path], dict[str, Any]] | None,
) -> dict[str, Any]:
    try:
        artifact = export_fn(point)
        profile = profile_fn(artifact)
        evaluation = eval_fn(artifact) if eval_fn is not None else None
    except Exception as exc:
        raise SweepError(
            f"Sweep point mode={point.mode!r} r={point.r} failed: {str(exc).rstrip('.')}. Finished points are saved; "
            "fix the cause and rerun the same command to resume."
        ) from exc
    return {
        "key": key,
        "mode": point.mode,
        "r": point.r,
        "config_key": config_key,
        "artifact": str(artifact),
        "profile": profile,
        "eval": evaluation,
    }
