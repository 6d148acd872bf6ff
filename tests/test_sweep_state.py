"""Resumable sweep: interruption, resume without redoing finished points, config keys, bad state."""

import json
from pathlib import Path

import pytest

from tofu_export.sweep.state import SweepError, SweepPoint, point_key, run_sweep

POINTS = [SweepPoint("tofu", r) for r in (0, 4, 8, 12)]


class Recorder:
    """export/profile/eval stand-ins that log their calls; export can be told to fail on one point."""

    def __init__(self, root: Path, fail_on: SweepPoint | None = None) -> None:
        self.root, self.fail_on = root, fail_on
        self.exported: list[SweepPoint] = []
        self.profiled: list[Path] = []

    def export(self, point: SweepPoint) -> Path:
        self.exported.append(point)
        if point == self.fail_on:
            raise OSError("disk full")
        path = self.root / f"{point.mode}_r{point.r}.onnx"
        path.write_text("model")
        return path

    def profile(self, artifact: Path) -> dict:
        self.profiled.append(artifact)
        return {"latency_ms": 10.0 - int(artifact.stem.split("_r")[1]) * 0.5}

    def evaluate(self, artifact: Path) -> dict:
        return {"accuracy": 80.0}


def sweep(recorder: Recorder, state: Path, config_key: str = "ckpt=abc,img=64") -> list[dict]:
    return run_sweep(
        POINTS, state_path=state, export_fn=recorder.export, profile_fn=recorder.profile,
        eval_fn=recorder.evaluate, config_key=config_key, progress=False,
    )  # fmt: skip


def test_interrupted_sweep_resumes_without_redoing_finished_points(tmp_path: Path) -> None:
    state = tmp_path / "sweep.json"
    first = Recorder(tmp_path, fail_on=POINTS[2])
    with pytest.raises(SweepError, match="r=8"):
        sweep(first, state)
    assert first.exported == POINTS[:3]
    assert len(json.loads(state.read_text())["points"]) == 2

    second = Recorder(tmp_path)
    records = sweep(second, state)
    assert second.exported == POINTS[2:]  # the first two points were neither exported nor profiled again
    assert [p.name for p in second.profiled] == ["tofu_r8.onnx", "tofu_r12.onnx"]
    assert [(r["mode"], r["r"]) for r in records] == [(p.mode, p.r) for p in POINTS]
    assert records[1]["profile"] == {"latency_ms": 8.0} and records[3]["eval"] == {"accuracy": 80.0}
    assert records[0]["key"] == point_key(POINTS[0], "ckpt=abc,img=64")

    third = Recorder(tmp_path)
    assert sweep(third, state) == records and third.exported == []


def test_changed_config_key_reruns_every_point(tmp_path: Path) -> None:
    state = tmp_path / "sweep.json"
    sweep(Recorder(tmp_path), state)
    rerun = Recorder(tmp_path)
    sweep(rerun, state, config_key="ckpt=def,img=64")
    assert rerun.exported == POINTS
    assert len(json.loads(state.read_text())["points"]) == 2 * len(POINTS)


def test_point_key_depends_on_every_input() -> None:
    keys = {
        point_key(SweepPoint("tofu", 4), "a"),
        point_key(SweepPoint("tome", 4), "a"),
        point_key(SweepPoint("tofu", 8), "a"),
        point_key(SweepPoint("tofu", 4), "b"),
    }
    assert len(keys) == 4 and point_key(SweepPoint("tofu", 4), "a") == point_key(SweepPoint("tofu", 4), "a")


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "points": {}}', "[]"])
def test_unusable_state_file_is_reported(tmp_path: Path, content: str) -> None:
    state = tmp_path / "sweep.json"
    state.write_text(content)
    with pytest.raises(SweepError, match="sweep"):
        sweep(Recorder(tmp_path), state)


def test_progress_bar_renders(tmp_path: Path) -> None:
    records = run_sweep(
        POINTS[:2], state_path=tmp_path / "s.json", export_fn=Recorder(tmp_path).export,
        profile_fn=Recorder(tmp_path).profile, eval_fn=None, progress=True,
    )  # fmt: skip
    assert [r["eval"] for r in records] == [None, None]
