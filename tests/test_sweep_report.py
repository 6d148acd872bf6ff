"""The sweep's rows: speed-up against the baseline with the per-round spread, the uncertain-ranking flag, columns
shown only where measured; progress lines for logs; the backend option; the run-time estimate."""

from __future__ import annotations

import io

import pytest

from tofu_export.errors import UserError
from tofu_export.jobs.profile import Backend, parse_backend
from tofu_export.progress import ProgressLog, format_seconds, tracker
from tofu_export.reports.sweep import COLUMNS, flag_uncertain, shown_columns, sweep_markdown, sweep_row, table_cells
from tofu_export.sweep.config import SweepConfig, estimate_seconds


def _record(mode: str, r: int, samples: list[float], metrics: dict | None = None) -> dict:
    return {"mode": mode, "r": r, "profile": {"gflops": 4.0 - r / 10, "samples_ms": samples},
            "eval": None if metrics is None else {"metrics": metrics}}


BASE = [20.0, 22.0, 20.0, 21.0, 40.0]  # a slow spell in round 4 hits every point (interleaved)
FAST = [10.0, 11.0, 10.0, 10.5, 20.0]  # exactly 2x every round
CLOSE = [10.2, 11.1, 9.9, 10.6, 20.5]  # within the spread of FAST


def test_interleaved_speedup_is_the_per_round_ratio() -> None:
    row = sweep_row(_record("tofu", 16, FAST), BASE, paired=True)
    assert row["speedup"] == pytest.approx(21.0 / 10.5)
    assert row["speedup_p10"] == pytest.approx(2.0) and row["speedup_p90"] == pytest.approx(2.0)
    assert (row["latency_ms"], row["rounds"]) == (10.5, 5)


def test_interleaved_speedup_is_the_median_of_the_per_round_ratios_inside_their_spread() -> None:
    """The ratio of the two medians (0.63 / 0.69 = 0.913) can fall outside the per-round spread it is shown with
    (0.935-0.972): the rounds' slow spells differ. The median of the per-round ratios cannot."""
    base, point = [0.60, 0.70, 0.62, 0.71, 0.63], [0.62, 0.72, 0.64, 0.73, 0.69]
    row = sweep_row(_record("tome", 2, point), base, paired=True)
    assert row["speedup"] == pytest.approx(0.62 / 0.64)
    assert row["speedup_p10"] < row["speedup"] < row["speedup_p90"]


def test_unpaired_speedup_spread_comes_from_the_point_percentiles() -> None:
    row = sweep_row(_record("tofu", 16, FAST), BASE, paired=False)
    assert row["speedup_p10"] == pytest.approx(21.0 / row["p90_ms"])
    assert row["speedup_p90"] == pytest.approx(21.0 / row["p10_ms"])
    assert row["speedup_p10"] < 2.0 < row["speedup_p90"]


def test_overlapping_points_are_flagged_and_a_clear_baseline_is_not() -> None:
    rows = [sweep_row(_record(*point), BASE, paired=True)
            for point in (("baseline", 0, BASE), ("tome", 16, FAST), ("tofu", 16, CLOSE))]
    flag_uncertain(rows)
    flags = {row["mode"]: (row["rank"], row["uncertain"]) for row in rows}
    assert flags["baseline"] == (3, False)
    assert flags["tome"][1] and flags["tofu"][1]
    assert {flags["tome"][0], flags["tofu"][0]} == {1, 2}
    assert table_cells(rows[1])[-1].endswith("~") and table_cells(rows[0])[-1] == "3"


def test_columns_appear_only_where_measured_and_cells_carry_units() -> None:
    bare = [sweep_row(_record("tofu", 8, FAST), None, paired=True)]
    flag_uncertain(bare)
    assert [COLUMNS[i] for i in shown_columns(bare)] == ["point", "GFLOPs", "latency p50 (p10-p90)", "rank"]
    scored = [sweep_row(_record("tofu", 8, FAST, {"cosine_mean": 0.99876, "cosine_se": 0.00012}), BASE, True)]
    flag_uncertain(scored)
    cells = dict(zip(COLUMNS, table_cells(scored[0]), strict=True))
    assert cells["fidelity"] == "cosine 0.9988 ± 0.0001"
    assert cells["speed-up (p10-p90)"] == "2.00x (2.00-2.00)"
    assert cells["latency p50 (p10-p90)"].startswith("10.50 ms (")
    text = sweep_markdown(scored, "T", ["caption line"])
    assert "caption line" in text and "| tofu r=8 | 3.20 |" in text and "n/a" not in text


def test_classifier_fidelity_shows_the_unreduced_accuracy_beside_it() -> None:
    metrics = {"candidate_top1": 71.2, "reference_top1": 72.0}  # evaluation scores in %
    row = sweep_row(_record("tome", 8, FAST, metrics), BASE, paired=True)
    flag_uncertain([row])
    assert table_cells(row)[4] == "top-1 71.2% (unreduced 72.0%)"


def test_backbone_fidelity_shows_its_cosine_and_names_its_knn_accuracy() -> None:
    """A headless backbone scored on train/ and test/: its cosine leads, and the accuracy is said to be k-NN (it read
    "top-1 40.0%" alone, as if a classifier's)."""
    metrics = {"cosine_mean": 0.99861, "cosine_se": 0.00031, "candidate_knn_top1": 40.0, "reference_knn_top1": 42.0}
    row = sweep_row(_record("tofu", 16, FAST, metrics), BASE, paired=True)
    flag_uncertain([row])
    assert table_cells(row)[4] == "cosine 0.9986 ± 0.0003; k-NN top-1 40.0% (unreduced 42.0%)"


def test_progress_lines_carry_elapsed_time_and_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    log = ProgressLog("sweep", 4, every_s=5.0, stream=stream, clock=lambda: now[0])
    log.status("tome r=8")  # no line: nothing to say yet
    now[0] = 10.0
    log.advance()
    now[0] = 12.0
    log.advance()  # under 5 s since the last line: silent
    now[0] = 20.0
    log.advance()
    now[0] = 21.0
    log.advance()  # the end is always written
    lines = stream.getvalue().splitlines()
    assert lines == ["sweep: 1/4 (tome r=8), 10 s elapsed, ETA 30 s", "sweep: 3/4 (tome r=8), 20 s elapsed, ETA 7 s",
                     "sweep: 4/4 (tome r=8), 21 s elapsed, ETA 0 s"]
    assert format_seconds(185) == "3m05s" and format_seconds(3720) == "1h02m"


def test_a_job_of_stages_says_each_stage_as_it_begins_and_counts_unknown_totals() -> None:
    """calibrate's stages (damage, block latency, the chosen graph timed) each take minutes: a log shows each one
    when it begins, timed from then; a stage whose length is not known counts what it has done."""
    now = [0.0]
    stream = io.StringIO()
    log = ProgressLog("calibrate", 1, every_s=5.0, stream=stream, clock=lambda: now[0])
    now[0] = 100.0
    log.stage("calibrate: damage", 10)
    now[0] = 106.0
    log.advance(5)
    log.resize(8)  # the stage's length, known better now: what is done stays
    assert (log.done, log.total) == (5, 8) and log.line() == "calibrate: damage: 5/8, 6 s elapsed, ETA 4 s"
    log.stage("calibrate: around the floor", 0)
    now[0] = 112.0
    log.advance()
    log.advance()  # 6 s since the stage's line: written; an unknown total never forces one
    log.finish()  # the last count, said once
    log.finish()
    assert stream.getvalue().splitlines() == [
        "calibrate: damage: 0/10, 0 s elapsed", "calibrate: damage: 5/10, 6 s elapsed, ETA 6 s",
        "calibrate: around the floor: 0 done, 0 s elapsed", "calibrate: around the floor: 1 done, 6 s elapsed",
        "calibrate: around the floor: 2 done, 6 s elapsed"]


def test_backend_names_and_the_renamed_device_option() -> None:
    assert parse_backend(None, path="model.onnx") == Backend("ort")
    assert parse_backend(None, path="model.engine").runtime == "trt"
    assert parse_backend(None, path="model.pth").runtime == "torch"
    assert parse_backend(None).name == "ort"  # the sweep's default
    assert parse_backend("ort-trt").runtime == "ort" and not parse_backend("ort-cuda").on_cpu
    assert parse_backend("torch", "cuda") == Backend("torch", "cuda")
    with pytest.raises(UserError, match="use backend ort-cuda instead of device cuda") as caught:
        parse_backend("ort", "cuda")
    assert caught.value.hint.value == "ort-cuda"
    with pytest.raises(UserError, match="unknown backend 'tvm'"):
        parse_backend("tvm")


def test_cuda_graphs_need_torch_on_cuda() -> None:
    chosen = parse_backend("torch", "cuda", cuda_graphs=True)
    assert chosen == Backend("torch", "cuda", cuda_graphs=True) and chosen.label == "PyTorch cuda, CUDA graphs"
    assert parse_backend("torch", "cuda").label == "PyTorch cuda"
    with pytest.raises(UserError, match="not device 'cpu'") as caught:
        parse_backend("torch", "cpu", cuda_graphs=True)
    assert (caught.value.hint.option, caught.value.hint.value) == ("device", "cuda")
    with pytest.raises(UserError, match="not backend 'ort'") as caught:
        parse_backend(None, path="model.onnx", cuda_graphs=True)
    assert (caught.value.hint.option, caught.value.hint.value) == ("backend", "torch")


def test_estimate_grows_with_exports_points_and_images() -> None:
    small = SweepConfig(r_values=(0, 8), modes=("tome",))
    big = SweepConfig(r_values=(0, 8, 16), modes=("tome", "tofu"))
    assert estimate_seconds(small, to_export=0, forward_ms=10) < estimate_seconds(small, to_export=2, forward_ms=10)
    assert estimate_seconds(big, to_export=4, forward_ms=10, workers=2) == estimate_seconds(big, to_export=2,
                                                                                           forward_ms=10)
    assert estimate_seconds(small, to_export=2, forward_ms=10) < estimate_seconds(big, to_export=5, forward_ms=10)
    assert estimate_seconds(big, to_export=0, forward_ms=10) < estimate_seconds(big, to_export=0, forward_ms=10,
                                                                                images=100)

    assert estimate_seconds(big, to_export=5, forward_ms=10, busy=7.0) > 5 * estimate_seconds(big, to_export=5,
                                                                                               forward_ms=10)


def test_an_announced_tracker_says_its_first_stage_before_its_first_unit(capsys: pytest.CaptureFixture[str]) -> None:
    """calibrate's unreduced pass and a denoiser's reference run take minutes before their first unit ends: in a log
    their line comes at once; an unannounced tracker (an evaluation's batches) stays quiet until there is progress."""
    with tracker("calibrate: unreduced pass", 1, announce=True):
        assert capsys.readouterr().err == "calibrate: unreduced pass: 0/1, 0 s elapsed\n"
    with tracker("extracting features", 4):
        assert capsys.readouterr().err == ""
