"""Reports: Markdown table, atomic JSON / Markdown writes, Pareto front and PNG plots."""

import json
from pathlib import Path

import pytest

from tofu_export.atomic import write_json_atomic
from tofu_export.engines.base import OpTime
from tofu_export.output_paths import is_tofu_png
from tofu_export.profiling.breakdown import summarize
from tofu_export.profiling.device import describe_device
from tofu_export.profiling.errors import ProfilerError
from tofu_export.profiling.memory import MemoryReport
from tofu_export.profiling.profiler import BatchResult, ProfileResult
from tofu_export.profiling.tegrastats import PowerReport
from tofu_export.profiling.timing import LatencyStats
from tofu_export.reports.pareto import TradeoffPoint, pareto_front
from tofu_export.reports.plots import plot_latency_vs_r, plot_pareto
from tofu_export.reports.profile import render_table, write_json, write_markdown
from tofu_export.reports.profile_plot import plot_profile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_result() -> ProfileResult:
    ops = [OpTime("/blocks.0/mlp/fc1/MatMul", "MatMul", 2.0), OpTime("/blocks.0/reduce/TopK", "TopK", 0.5)]
    batches = [
        BatchResult(
            batch_size=batch,
            latency=LatencyStats.from_samples([0.002 * batch, 0.004 * batch], batch),
            memory=MemoryReport(512.0, None, None, "backend runs on cpu, not CUDA"),
            power=PowerReport(True, None, 3, "VDD_IN", 6000.0, 12.5, 50.0, 3000, 7620),
            breakdown=summarize(ops) if batch == 1 else None,
        )
        for batch in (1, 8)
    ]
    return ProfileResult(backend="onnxruntime[CPU]", device=describe_device(), batches=batches)


def test_render_table_has_one_row_per_batch_and_a_breakdown_table() -> None:
    text = render_table([make_result()])
    rows = [line for line in text.splitlines() if line.startswith("| onnxruntime[CPU] |")]
    assert len(rows) == 3  # two latency rows, one breakdown row (only batch 1 was op-profiled)
    assert rows[0].split(" | ")[3] == "3.000"  # mean of 2 ms and 4 ms
    assert "6.000" in rows[0] and "12.500" in rows[0]  # watts and mJ/image
    assert "token_reduction ms" in text and "n/a" not in text
    assert "CUDA peak MiB" not in text and "peak RSS MiB" in text  # a column nothing was measured in is left out


def test_write_markdown_and_json(tmp_path: Path) -> None:
    result = make_result()
    markdown = write_markdown(tmp_path / "out" / "report.md", [result], title="Tiny ViT")
    text = markdown.read_text()
    assert text.startswith("# Tiny ViT") and "/blocks.0/reduce/TopK" in text and "token_reduction" in text
    written = write_json(tmp_path / "report.json", [result])
    assert json.loads(written.read_text()) == [json.loads(json.dumps(result.to_dict()))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json"]  # no temp files left


def test_failed_atomic_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_json_atomic(tmp_path / "state.json", {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_pareto_front_hand_checked() -> None:
    points = [
        {"mode": "none", "r": 0, "latency_ms": 10.0, "accuracy": 80.0},
        {"mode": "tofu", "r": 4, "latency_ms": 7.0, "accuracy": 79.5},
        {"mode": "tome", "r": 4, "latency_ms": 7.0, "accuracy": 79.0},  # dominated by tofu r=4
        {"mode": "tofu", "r": 8, "latency_ms": 5.0, "accuracy": 77.0},
        {"mode": "tome", "r": 8, "latency_ms": 6.0, "accuracy": 76.0},  # dominated by tofu r=8
        {"mode": "tofu", "r": 16, "latency_ms": 4.0},  # no accuracy: not ranked
    ]
    front = pareto_front(points)
    assert [(p.mode, p.r) for p in front] == [("tofu", 8), ("tofu", 4), ("none", 0)]


def test_point_coercion_errors_name_missing_fields() -> None:
    with pytest.raises(ProfilerError, match="latency_ms"):
        TradeoffPoint.coerce({"mode": "tofu", "r": 4})


def test_plots_write_png_files(tmp_path: Path) -> None:
    points = [
        TradeoffPoint(mode, r, latency_ms=10.0 - r * speed, accuracy=80.0 - r * 0.2)
        for mode, speed in (("tofu", 0.4), ("tome", 0.35))
        for r in (0, 4, 8, 12)
    ]
    for path in (plot_latency_vs_r(points, tmp_path / "lat.png"), plot_pareto(points, tmp_path / "pareto.png")):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        assert is_tofu_png(path)  # every PNG tofu-export writes is marked as its own (reports.png)


def _figures_drawn_by(module, monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures ``module`` hands to ``save_png`` from now on, kept instead of written (their axes are read)."""
    figures: list = []
    monkeypatch.setattr(module, "save_png", lambda figure, path: figures.append(figure) or Path(path))
    return figures


def test_latency_vs_r_ticks_only_whole_r(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """r is a count of tokens: with r = 0, 2, 4 matplotlib's default ticks fell at 0.5, 1.5, ..."""
    from tofu_export.reports import plots

    figures = _figures_drawn_by(plots, monkeypatch)
    plot_latency_vs_r([TradeoffPoint(mode, r, latency_ms=1.0 - r / 10) for mode in ("tome", "tofu") for r in (0, 2, 4)],
                      tmp_path / "lat.png")
    ticks = [tick for tick in figures[0].axes[0].get_xticks() if 0 <= tick <= 4]
    assert len(ticks) >= 3 and all(float(tick).is_integer() for tick in ticks), ticks


@pytest.mark.parametrize(("p50", "speedup", "title", "labels"), [
    ((74.54, 124.72), 1.673, "1.67x faster", ["124.7 ms", "74.5 ms"]),
    ((0.63, 0.58), 0.92, "1.09x slower", ["0.58 ms", "0.63 ms"]),  # a tiny model: the reduction costs more
])
def test_the_quick_look_panel_says_slower_and_keeps_small_latencies_apart(
    p50: tuple[float, float], speedup: float, title: str, labels: list[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tofu_export.manifest import QuickLatency, Spread
    from tofu_export.reports import artifact_plot

    figures = _figures_drawn_by(artifact_plot, monkeypatch)
    tofu, baseline = (Spread(ms, ms * 0.95, ms * 1.05, ms * 0.9, ms * 1.1, 20) for ms in p50)
    latency = QuickLatency(baseline, tofu, speedup, {"p10": speedup, "p90": speedup}, load=[1.0, 1.0, 1.0])
    artifact_plot.plot_artifact(tmp_path / "report.png", [17, 15], latency, "ToFu r=2")
    tokens, panel = figures[0].axes
    assert all(float(tick).is_integer() for tick in tokens.get_yticks())  # 17 tokens: no tick at 2.5
    assert panel.get_title().startswith(title)
    assert [text.get_text() for text in panel.texts if text.get_text().endswith(" ms")] == labels


def test_the_policy_figure_ticks_whole_blocks_and_tokens_and_keys_its_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-block model's calibration figure put ticks at block 0.25 and at 15.25 tokens; its title's ``pr4 -``
    said nothing of what ``pr`` and ``-`` are."""
    from tofu_export.calibration import plot
    from tofu_export.policy import Policy

    latency = {"block_ms": {"none": [1.0, 0.9], "prune": [1.01, 0.91], "mean": [1.03, 0.93], "mlerp": [1.04, 0.94]},
               "tokens": [17, 15], "backend": "onnxruntime-cpu", "rounds": 40}
    measurements = {"r": 2, "damage": {mode: [1e-3, 1e-7] for mode in ("prune", "mean", "mlerp")},
                    "linearity": [{"mean": 0.014, "p90": 0.027}, {"mean": 0.013, "p90": 0.027}], "latency": latency,
                    "predicted_cosine": 0.984, "measured_cosine": 0.996, "predicted_speedup": 1.1}
    model = {"depth": 2, "tokens": 17, "num_prefix": 1, "img_size": [64, 64]}
    policy = Policy(("prune", "mlerp"), (4, 0), model, {"images": {"count": 12}}, measurements)
    figures = _figures_drawn_by(plot, monkeypatch)
    plot.plot_policy(policy, tmp_path / "policy.png")
    for axes, (low, high) in zip(figures[0].axes, [(0, 1), (0, 1), (15, 17)], strict=True):
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert ticks and all(float(tick).is_integer() for tick in ticks), (axes.get_title(), ticks)
    assert "(pr prune, me mean, ml MLERP, - none):\npr4 -\n" in figures[0].get_suptitle()


def test_the_damage_panel_names_the_images_the_damage_was_measured_on(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The damage panel said "64 images" (every calibration image, the held-out ones too) where the damage per
    block is measured on 32 of the 48 search images; a record from before the damage count names the search
    images."""
    from tofu_export.calibration import plot
    from tofu_export.policy import Policy

    latency = {"block_ms": {mode: [1.0, 0.9] for mode in ("none", "prune", "mean", "mlerp")}, "tokens": [17, 15],
               "backend": "onnxruntime-cpu", "rounds": 40}
    measurements = {"r": 2, "damage": {mode: [1e-3, 1e-5] for mode in ("prune", "mean", "mlerp")},
                    "linearity": [{"mean": 0.01, "p90": 0.02}] * 2, "latency": latency,
                    "predicted_cosine": 0.99, "measured_cosine": 0.99, "predicted_speedup": 1.1}
    model = {"depth": 2, "tokens": 17, "num_prefix": 1, "img_size": [64, 64]}
    for images, named in [({"count": 64, "held_out": 16, "confirm": 192, "damage": 32}, "; 32 images)"),
                          ({"count": 64, "held_out": 16}, "; 48 images)"), ({}, "; ? images)")]:
        figures = _figures_drawn_by(plot, monkeypatch)
        plot.plot_policy(Policy(("mean", "mlerp"), (2, 2), model, {"images": images}, measurements),
                         tmp_path / "policy.png")
        assert figures[0].axes[0].get_title().endswith(named), (images, figures[0].axes[0].get_title())


def test_the_policy_figure_of_a_deep_model_keeps_its_titles_inside(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 12-block DINOv2 calibration's title, its policy on one line, ran off both sides of the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from tofu_export.calibration import plot
    from tofu_export.policy import Policy

    depth, tokens = 24, [577, 449, 321]
    latency = {"block_ms": {mode: [1.0, 0.8, 0.6] for mode in ("none", "prune", "mean", "mlerp")}, "tokens": tokens,
               "backend": "onnxruntime-tensorrt", "rounds": 40}
    measurements = {"r": 16, "damage": {mode: [1e-4] * depth for mode in ("prune", "mean", "mlerp")},
                    "linearity": [{"mean": 0.05, "p90": 0.08}] * depth, "latency": latency,
                    "predicted_cosine": 0.99826, "measured_cosine": 0.99548, "predicted_speedup": 1.74}
    model = {"depth": depth, "tokens": 577, "num_prefix": 1, "img_size": [384, 384]}
    modes = ("mlerp", "mean", "prune") * 8
    policy = Policy(modes, (24, 16, 0) * 8, model, {"images": {"count": 128}}, measurements)
    figures = _figures_drawn_by(plot, monkeypatch)
    plot.plot_policy(policy, tmp_path / "policy.png")
    figure = figures[0]
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    texts = [figure._suptitle] + [axes.title for axes in figure.axes]
    assert "ml24 me16 - ml24" in figure.get_suptitle()
    for text in texts:
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (text.get_text(), box.x0, box.x1, figure.bbox.width)


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[16:24]  # IHDR: width, height
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_profile_plot_has_a_parts_panel_only_where_the_op_profiler_ran(tmp_path: Path) -> None:
    result = make_result()  # batch 1 op-profiled, batch 8 not
    both = plot_profile([result], tmp_path / "both.png")
    plain = ProfileResult(result.backend, result.device, [
        BatchResult(b.batch_size, b.latency, b.memory, b.power, None) for b in result.batches])
    latency_only = plot_profile([plain], tmp_path / "latency.png")
    assert both.read_bytes().startswith(PNG_MAGIC) and is_tofu_png(both) and is_tofu_png(latency_only)
    (width2, height2), (width1, height1) = _png_size(both), _png_size(latency_only)
    assert height2 == height1 and width2 > 1.8 * width1  # two panels against one
    with pytest.raises(ProfilerError, match="at least one measured batch"):
        plot_profile([ProfileResult(result.backend, result.device, [])], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_pareto_plot_needs_accuracy(tmp_path: Path) -> None:
    with pytest.raises(ProfilerError, match="accuracy"):
        plot_pareto([TradeoffPoint("tofu", 4, 5.0)], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_latency_plot_starts_every_mode_line_at_the_shared_baseline() -> None:
    from tofu_export.reports.plots import _by_mode

    points = [TradeoffPoint("baseline", 0, 10.0), TradeoffPoint("tome", 8, 7.0), TradeoffPoint("tofu", 8, 6.0)]
    groups = _by_mode(points, share_baseline=True)
    assert {mode: [p.r for p in group] for mode, group in groups.items()} == {"tome": [0, 8], "tofu": [0, 8]}
    assert set(_by_mode(points)) == {"baseline", "tome", "tofu"}  # the Pareto plot keeps it a point of its own
