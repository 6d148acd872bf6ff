"""The quick look (baseline r = 0 vs ToFu on ONNX Runtime CPU) and the TensorRT target rules it is reported with."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tofu_export.config import ToFuConfig
from tofu_export.engines.ort import OrtRunner
from tofu_export.errors import UserError
from tofu_export.exporters.onnx import export_onnx
from tofu_export.manifest import TrtCheckRecord
from tofu_export.profiling.device import describe_device
from tofu_export.quicklook import (
    QuickLookDataError,
    QuickLookSettings,
    compare_latency,
    export_baseline,
    fidelity,
    image_files,
    load_images,
    rounds_for,
    run_quick_look,
    time_models,
)
from tofu_export.tensorrt.targets import UnknownTargetError, export_opset, resolve_targets, target_verdicts

pytestmark = pytest.mark.usefixtures("shared_traces")  # one dynamo trace per distinct model (trace_cache)

IMG = 32


def tiny_vit(num_classes: int = 7) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=8, depth=2,
                             num_classes=num_classes).eval()  # fmt: skip


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unpatched model, its r = 0 baseline and a ToFu r = 4 graph of the same weights, exported."""
    folder = tmp_path_factory.mktemp("quicklook")
    model = tiny_vit()
    tofu = copy.deepcopy(model)
    ToFuConfig(r=4, img_size=IMG).patch(tofu)
    return {
        "plain": export_onnx(copy.deepcopy(model), folder / "plain.onnx", IMG).path,
        "baseline": export_baseline(copy.deepcopy(model), folder / "baseline.onnx", IMG, opset=17).path,
        "tofu": export_onnx(tofu, folder / "tofu.onnx", IMG).path,
    }


def test_baseline_r0_graph_equals_the_unreduced_model_exactly(graphs: dict[str, Path]) -> None:
    images = torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    baseline = OrtRunner(graphs["baseline"], threads=1)(images)
    assert np.array_equal(baseline.numpy(), OrtRunner(graphs["plain"], threads=1)(images).numpy())
    with torch.no_grad():
        torch.testing.assert_close(baseline, tiny_vit()(images), atol=1e-5, rtol=0)


def test_speedup_is_the_median_of_the_per_round_ratios() -> None:
    """Per round 2.0, 2.0, 2.75, 4.29 and 0.45: the median ratio is 2.0 (the ratio of the medians is 11 / 6). With
    rounds of very different speed the ratio of the medians can even fall outside the per-round range printed beside
    it: below, 10 / 20 = 0.5 against per-round ratios 2, 0.5 and 2."""
    baseline, tofu = [10.0, 12.0, 11.0, 30.0, 9.0], [5.0, 6.0, 4.0, 7.0, 20.0]
    result = compare_latency(baseline, tofu)
    assert result["speedup"] == pytest.approx(2.0)
    assert result["baseline"]["p50_ms"] == 11.0 and result["tofu"]["p50_ms"] == 6.0
    assert result["baseline"]["p10_ms"] == pytest.approx(np.percentile(baseline, 10))
    ratios = np.array(baseline) / np.array(tofu)
    assert result["speedup_per_round"]["p10"] == pytest.approx(np.percentile(ratios, 10))
    assert result["speedup_per_round"]["p90"] == pytest.approx(np.percentile(ratios, 90))
    assert result["baseline"]["rounds"] == 5
    spread_out = compare_latency([1.0, 10.0, 100.0], [0.5, 20.0, 50.0])
    per = spread_out["speedup_per_round"]
    assert spread_out["speedup"] == pytest.approx(2.0) and per["p10"] <= 2.0 <= per["p90"] and per["p10"] > 0.5


def test_timed_run_reports_its_own_medians(graphs: dict[str, Path]) -> None:
    settings = QuickLookSettings(budget_s=0.2, min_rounds=4, max_rounds=12, threads=1)
    result = time_models(graphs["baseline"], graphs["tofu"], settings)
    assert 4 <= result["baseline"]["rounds"] == result["tofu"]["rounds"] <= 12
    per = result["speedup_per_round"]
    assert per["p10"] <= result["speedup"] <= per["p90"]  # the median of the same per-round ratios
    for side in ("baseline", "tofu"):
        stats = result[side]
        assert 0 < stats["min_ms"] <= stats["p10_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    assert result["timed_on"] == "seeded normal noise"


def test_both_graphs_are_timed_on_the_image_given(graphs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    fed: list[tuple[str, torch.Tensor]] = []
    feed = OrtRunner.feed_images
    monkeypatch.setattr(OrtRunner, "feed_images", lambda self, images: fed.append((self.onnx_path.name, images))
                        or feed(self, images))
    image = torch.rand(1, 3, IMG, IMG)
    settings = QuickLookSettings(budget_s=0.05, min_rounds=2, max_rounds=2, threads=1)
    result = time_models(graphs["baseline"], graphs["tofu"], settings, image)
    assert sorted(name for name, _ in fed) == sorted([graphs["baseline"].name, graphs["tofu"].name])
    assert all(images is image for _, images in fed) and result["timed_on"] == "the first image"


@pytest.mark.parametrize(("budget", "round_s", "expected"), [(6.0, 0.5, 12), (6.0, 0.0001, 200), (6.0, 10.0, 7)])
def test_rounds_fit_the_budget_within_bounds(budget: float, round_s: float, expected: int) -> None:
    assert rounds_for(budget, round_s, min_rounds=7, max_rounds=200) == expected


def test_fidelity_is_one_for_the_same_graph_and_lower_for_tofu(graphs: dict[str, Path]) -> None:
    images = torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    same = fidelity(graphs["baseline"], graphs["plain"], images, classifier=True)
    assert same == {"images": 6, "cosine_mean": 1.0, "cosine_min": 1.0, "top1_agreement": 1.0}
    reduced = fidelity(graphs["baseline"], graphs["tofu"], images, classifier=False)
    assert reduced["cosine_min"] <= reduced["cosine_mean"] < 1.0
    assert reduced["top1_agreement"] is None


def _write_images(folder: Path, names: list[str], size: int = 40) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / name)


def test_image_files_filter_by_pattern_and_spread_the_limit(tmp_path: Path) -> None:
    _write_images(tmp_path, [f"imagenet_{i:02d}_1.png" for i in range(10)] + ["cifar10_00_3.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(image_files(tmp_path)) == 11
    chosen = image_files(tmp_path, "imagenet_*", limit=5)
    assert [p.name for p in chosen] == [f"imagenet_{i:02d}_1.png" for i in (0, 2, 4, 6, 8)]


def test_unreadable_or_missing_images_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(QuickLookDataError, match="does not exist"):
        image_files(tmp_path / "nowhere")
    with pytest.raises(QuickLookDataError, match="holds no images"):
        image_files(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(QuickLookDataError, match=r"broken\.png is not a readable image") as caught:
        load_images(image_files(tmp_path), lambda image: image)
    assert isinstance(caught.value, UserError) and caught.value.hint.option == "data"


def test_run_quick_look_fills_the_manifest_section(tmp_path: Path, graphs: dict[str, Path]) -> None:
    settings = QuickLookSettings(data=tmp_path, data_name="six noise images", budget_s=0.1, min_rounds=3,
                                 max_rounds=5, threads=1)
    images = torch.randn(6, 3, IMG, IMG)
    steps: list[str] = []
    result = run_quick_look(tiny_vit(), graphs["tofu"], IMG, settings, gflops={"original": 2.0, "tofu": 1.0},
                            onnx_settings={"opset": 17}, images=images, step=steps.append)
    assert result["label"] == "quick look on this machine, not a benchmark"
    device = describe_device()
    assert result["machine"] == {"cpu": device.cpu_model, "cores": os.cpu_count(), "cpu_features": device.cpu_features}
    assert result["gflops"] == {"baseline": 2.0, "tofu": 1.0}
    assert result["baseline"]["r"] == 0 and result["baseline"]["parity_max_abs_diff"] < 1e-4
    assert result["latency"]["speedup"] > 0 and result["fidelity"]["images"] == 6
    assert result["fidelity"]["name"] == "six noise images"
    assert 0 <= result["fidelity"]["top1_agreement"] <= 1  # a classifier: 7 classes
    assert len(steps) == 3


def test_fidelity_only_when_timing_is_off(graphs: dict[str, Path]) -> None:
    result = run_quick_look(tiny_vit(), graphs["tofu"], IMG, QuickLookSettings(timing=False),
                            gflops={"original": 2.0, "tofu": 1.0}, onnx_settings={}, images=torch.randn(2, 3, IMG, IMG))
    assert "latency" not in result and result["fidelity"]["images"] == 2


# ----------------------------------------------------------------------------------------------------
# TensorRT targets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("trt", "jetpack", "targets", "opset"), [
    ((), (), ("10",), 17),
    (("8.5",), (), ("8.5",), 16),
    ((), ("5",), ("8.5",), 16),
    (("10.3",), (), ("10",), 17),
    (("10,8.5",), (), ("8.5", "10"), 16),
    (("10",), ("5",), ("8.5", "10"), 16),
])  # fmt: skip
def test_targets_and_the_opset_that_follows(trt: tuple, jetpack: tuple, targets: tuple, opset: int) -> None:
    assert resolve_targets(trt, jetpack) == targets
    assert export_opset(targets) == opset


@pytest.mark.parametrize(("trt", "jetpack", "option"), [(("7.1",), (), "trt"), ((), ("4",), "jetpack")])
def test_unknown_targets_name_the_setting(trt: tuple, jetpack: tuple, option: str) -> None:
    with pytest.raises(UnknownTargetError) as caught:
        resolve_targets(trt, jetpack)
    assert caught.value.hint.option == option


def test_verdicts_mark_what_was_asked_for() -> None:
    layer_norm = {"target": "8.5", "severity": "error", "op_type": "LayerNormalization", "message": "no importer"}
    check = {"per_target": {"8.5": False, "10": True}, "issues": [
        {**layer_norm, "node": "ln"}, {**layer_norm, "node": "ln2"},
        {"target": "10", "severity": "warning", "op_type": "", "node": "input", "message": "INT64 input"},
    ]}  # fmt: skip
    verdicts = {v.target: v for v in target_verdicts(TrtCheckRecord.from_dict({**check, "build_for": ["10"]}))}
    assert verdicts["10"].builds and verdicts["10"].requested and verdicts["10"].errors == []
    assert not verdicts["8.5"].builds and not verdicts["8.5"].requested
    assert verdicts["8.5"].errors == ["LayerNormalization: no importer"] and verdicts["8.5"].jetpack == "5"


def test_the_export_and_the_quick_looks_baseline_run_side_by_side(tiny_checkpoint: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, call_log) -> None:
    """``pipeline.export_model`` exports the ToFu graph and the quick look's unreduced one at once, in forked workers
    where two cores are free (``exporters.workers``), each once; the quick look reads the baseline it was given."""
    from tofu_export import pipeline
    from tofu_export.config import ExportConfig, OnnxConfig
    from tofu_export.exporters.workers import can_fork, usable_cores
    from tofu_export.manifest import Manifest
    from tofu_export.models.loading import load_model

    monkeypatch.setattr(pipeline, "export_onnx", call_log.spy(pipeline.export_onnx))
    monkeypatch.setattr(pipeline, "export_baseline", call_log.spy(pipeline.export_baseline))
    config = ExportConfig(tofu=ToFuConfig(r=2), onnx=OnnxConfig(exporter="torchscript"))
    pipeline.export_model(load_model(tiny_checkpoint), tmp_path / "out", config,
                          quick_look=QuickLookSettings(budget_s=0.3, min_rounds=3))
    calls = call_log.calls()
    assert sorted("calibration" in call["kwargs"] for call in calls) == [False, True]  # the baseline, the ToFu graph
    pids = {call["pid"] for call in calls}
    side_by_side = usable_cores() >= 2 and can_fork()
    assert (len(pids) == 2 and os.getpid() not in pids) if side_by_side else pids == {os.getpid()}
    quick = Manifest.read(tmp_path / "out").quick_look
    assert quick is not None and quick.baseline["r"] == 0 and quick.latency is not None and quick.latency.speedup > 0
