"""One tiny sweep in-process: the model is loaded once and exported per point (no checkpoint written by the sweep),
timed round-robin by default, and the table says speed-up, spread, load and how sure the ranking is."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import CallLog
from PIL import Image
from safetensors.torch import save_file

from tofu_export.config import OnnxConfig
from tofu_export.errors import UserError
from tofu_export.exporters.workers import can_fork, usable_cores
from tofu_export.output_paths import is_tofu_png
from tofu_export.sweep import job as sweep_job
from tofu_export.sweep.config import SweepConfig
from tofu_export.sweep.job import SweepResult, _load, plot_note, run_sweep_job

ONNX = OnnxConfig(exporter="torchscript")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SweepResult, list[str]]:
    root = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64, num_classes=5)
    save_file(model.state_dict(), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))  # heads, block kind
    said: list[str] = []
    config = SweepConfig(r_values=(0, 2), modes=("tome", "tofu"), iters=4, threads=1, onnx=ONNX)
    exports = CallLog(root / "exports.jsonl")  # who exported each point: read by the estimate's test
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sweep_job, "export_model", exports.spy(sweep_job.export_model))
        result = run_sweep_job(str(root / "model.safetensors"), root / "out", config, say=said.append, progress=False)
    return root, result, said


def test_the_sweep_estimates_before_it_starts(swept: tuple[Path, SweepResult, list[str]]) -> None:
    """...and says how many of its exports run side by side (forked workers, one per core)."""
    root, _, said = swept
    workers = min(3, usable_cores()) if can_fork() else 1
    side = f", {workers} at a time" if workers > 1 else ""
    assert len(said) == 1 and said[0].startswith(f"3 points (3 to export{side}), estimated ")
    assert "load average" in said[0]
    pids = [call["pid"] for call in CallLog(root / "exports.jsonl").calls()]
    assert len(pids) == 3  # each point exported once: none failed ahead and was exported again in its turn
    assert (os.getpid() not in pids and len(set(pids)) == workers) if workers > 1 else pids == [os.getpid()] * 3


def test_rows_have_speedups_against_the_baseline_with_their_spread(swept: tuple[Path, SweepResult, list[str]]) -> None:
    root, result, _ = swept
    rows = {(row["mode"], row["r"]): row for row in result.rows}
    assert sorted(rows) == [("baseline", 0), ("tofu", 2), ("tome", 2)]
    assert rows["baseline", 0]["speedup"] == 1.0 and rows["baseline", 0]["rounds"] == 4
    for row in rows.values():
        assert 0 < row["speedup_p10"] <= row["speedup_p90"]
        assert row["rank"] in (1, 2, 3) and isinstance(row["uncertain"], bool)
    assert rows["tofu", 2]["gflops"] < rows["baseline", 0]["gflops"]
    assert json.loads((root / "out" / "sweep.json").read_text())["rows"] == result.rows


def test_the_caption_states_backend_rounds_order_and_load(swept: tuple[Path, SweepResult, list[str]]) -> None:
    root, result, _ = swept
    text = (root / "out" / "sweep.md").read_text()
    assert "ONNX Runtime CPU, 4 timed runs per point, round-robin" in text and "load average" in text
    assert ", on seeded normal noise; figures are medians" in text  # no images given
    assert "| baseline (r=0) |" in text and "n/a" not in text
    assert result.notes == ["no Pareto plot: the points were not scored (give an image folder to score them)"]
    assert not (root / "out" / "pareto.png").exists()


def test_the_sweep_writes_no_checkpoint_of_its_own(swept: tuple[Path, SweepResult, list[str]]) -> None:
    root, _, _ = swept
    assert not list((root / "out").glob("*.safetensors"))
    assert len(list((root / "out" / "artifacts").glob("*/model.onnx"))) == 3


def test_a_timm_name_gets_the_same_random_weights_every_run() -> None:
    config = SweepConfig(arch=None)
    first, second = (_load("test_vit", config).model for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                   strict=True))


def test_a_scored_sweep_reuses_its_exports_and_scores_every_point_against_one_reference(
    swept: tuple[Path, SweepResult, list[str]], tmp_path: Path
) -> None:
    """The same sweep with an image folder: the points' graphs are reused, each point is classified on the images,
    and the unreduced model (run once) gives every point the same reference; the r=0 graph keeps its classes."""
    root, _, _ = swept
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "images" / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    said: list[str] = []
    config = SweepConfig(r_values=(0, 2), modes=("tome", "tofu"), iters=4, threads=1, onnx=ONNX,
                         data=tmp_path / "images")
    result = run_sweep_job(str(root / "model.safetensors"), out, config, say=said.append, progress=False)
    assert said[0].startswith("3 points (0 to export)")
    rows = {(row["mode"], row["r"]): row for row in result.rows}
    assert len({row["reference_accuracy"] for row in rows.values()}) == 1
    assert rows["baseline", 0]["accuracy"] == rows["baseline", 0]["reference_accuracy"]
    assert "(unreduced " in (out / "sweep.md").read_text() and is_tofu_png(out / "latency_vs_r.png")
    assert f", on 1 image from {tmp_path / 'images'} (the model's eval transform);" in result.caption[0]  # not noise
    assert config.measured_as() != dataclasses.replace(config, data=None).measured_as()
    scores = {row["accuracy"] for row in rows.values()}
    same = "no Pareto plot: every point scores the same here (random weights give no front)"
    assert (result.notes == [same]) if len(scores) == 1 else is_tofu_png(out / "pareto.png")


def test_a_sweep_times_the_batch_it_is_given_and_reuses_its_exports(
    swept: tuple[Path, SweepResult, list[str]], tmp_path: Path
) -> None:
    """``--batch 4``: the same graphs, timed four images at a time (a GPU pays at larger batches); the caption, the
    plot note and images/s say it; the batch-1 records are not reused as batch-4 ones; a batch of 0 is refused."""
    root, _, _ = swept
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    said: list[str] = []
    config = SweepConfig(r_values=(0, 2), modes=("tome", "tofu"), iters=4, threads=1, onnx=ONNX, batch=4)
    result = run_sweep_job(str(root / "model.safetensors"), out, config, say=said.append, progress=False)
    assert said[0].startswith("3 points (0 to export)")
    assert result.caption[0].startswith("Batch-4 latency on ONNX Runtime CPU")
    assert plot_note(config, result.rows, [None]).startswith("ONNX Runtime CPU, batch 4, 4 runs round-robin")
    assert config.measured_as() != dataclasses.replace(config, batch=1).measured_as()  # measured anew
    for row in result.rows:
        assert row["images_per_s"] > 4 * 1e3 / row["p90_ms"] * 0.99  # 4 images per run, from the mean
    with pytest.raises(UserError, match="batch must be at least 1") as refused:
        SweepConfig(batch=0)
    assert (refused.value.hint.option, refused.value.hint.value) == ("batch", "1")
