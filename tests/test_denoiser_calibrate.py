"""``calibrate-denoiser`` on a diffusers denoiser (a tiny random DiT folder: class labels, DDIM from fixed noise):
it chooses per-block modes under a speed budget, measures the chosen step against the unreduced one with the
user's exporter and opset, writes a policy that ``denoiser --policy`` exports, and refuses budgets it cannot meet
with what it can. One calibration and one export are shared by the module."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from tofu_export.artifacts import ArtifactExistsError, check_output  # noqa: E402
from tofu_export.cli.app import app  # noqa: E402
from tofu_export.dense.plan import DensePolicy  # noqa: E402
from tofu_export.names import REDUCE_MODES  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread

BLOCKS = {"transformer_blocks.0", "transformer_blocks.1"}



@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                            num_embeds_ada_norm=10)  # the tiny DiT of test_diffusers.py
    folder = tmp_path_factory.mktemp("dit") / "transformer"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calibrated(dit_folder, tmp_path_factory):
    """``calibrate-denoiser --speedup 1.05`` (measured: torchscript at opset 16, 5 rounds), then ``denoiser
    --policy`` with the policy it wrote."""
    root = tmp_path_factory.mktemp("calibrated")
    runner = CliRunner()
    calibrate = runner.invoke(app, ["calibrate-denoiser", str(dit_folder), "--speedup", "1.05", "--samples", "1",
                                    "--exporter", "torchscript", "--opset", "16", "--rounds", "5",
                                    "-o", str(root / "policy.json")])
    export = runner.invoke(app, ["denoiser", str(dit_folder), "--policy", str(root / "policy.json"),
                                 "--exporter", "torchscript", "-o", str(root / "art")])
    return root, calibrate, export


def test_calibration_chooses_modes_under_the_speed_budget_and_measures_them(calibrated) -> None:
    root, calibrate, _ = calibrated
    assert calibrate.exit_code == 0, calibrate.output
    policy = DensePolicy.load(root / "policy.json")
    assert policy.blocks and set(policy.blocks) <= BLOCKS
    assert {plan.mode for plan in policy.blocks.values()} <= set(REDUCE_MODES)
    notes = policy.notes
    assert notes["family"] == "diffusers" and notes["model"] == "DiTTransformer2DModel" and "DDIM" in notes["sampler"]
    assert notes["predicted_speedup"] >= 1.05 and notes["runs"] >= 1 + 3 + 2 * 2
    measured = notes["measured"]
    assert (measured["exporter"], measured["opset"], measured["rounds"]) == ("torchscript", 16, 5)
    assert math.isfinite(notes["measured_speedup"]) and notes["measured_speedup"] > 0
    assert measured["baseline"]["n"] == measured["policy"]["n"] == measured["compared"]["tome"]["latency"]["n"] == 5
    tome = notes["tome_for_sd"]  # ToMe for SD at the same ratio: its PSNR from the calibration, timed in the rounds
    assert tome["measured_speedup"] > 0 and tome["psnr"] <= notes["calibration_psnr"] + 1e-9  # mean was a candidate
    out = " ".join(calibrate.output.split())  # the table, unwrapped
    assert "speed-up, predicted" in out and "speed-up, measured" in out and "ToMe for SD" in out
    assert f"{notes['predicted_speedup']:.3f}x" in out and f"{notes['measured_speedup']:.3f}x" in out


def test_denoiser_exports_the_calibrated_policy(calibrated) -> None:
    root, _, export = calibrated
    assert export.exit_code == 0, export.output
    record = json.loads((root / "art" / "export.json").read_text())
    assert record["parity"]["ok"] and record["tensorrt"]["ok"] and record["input_names"] == ["sample", "timestep",
                                                                                             "label"]
    assert sorted(p.name for p in (root / "art").iterdir()) == ["export.json", "manifest.json", "model.onnx",
                                                                 "policy.json"]
    with pytest.raises(ArtifactExistsError, match="an artifact folder from an earlier export"):
        check_output(root / "art")  # the denoiser's folder is tofu-export's: --force may replace it ...
    assert check_output(root / "art", force=True) is not None
    (root / "art" / "notes.txt").write_text("mine")  # ... until it holds a file tofu-export did not write
    with pytest.raises(ArtifactExistsError, match=r"notes\.txt"):
        check_output(root / "art", force=True)
    written = DensePolicy.load(root / "art" / "policy.json")
    assert written.blocks == DensePolicy.load(root / "policy.json").blocks
    table = " ".join(export.output.split())  # the table repeats what the policy's calibration measured
    assert "calibration: speed-up" in table and f"measured {written.notes['measured_speedup']:.3f}x" in table
    assert f"PSNR {written.notes['calibration_psnr']:.2f} dB" in table


def test_unreachable_budgets_name_what_is_reachable(dit_folder, tmp_path) -> None:
    runner = CliRunner()
    floor = runner.invoke(app, ["calibrate-denoiser", str(dit_folder), "--min-psnr", "200", "--samples", "1",
                                "-o", str(tmp_path / "a.json")])
    assert floor.exit_code == 2, floor.output
    assert "200 dB is not reachable with any block reducing 0.5 of its tokens" in floor.output
    assert "--min-psnr" in floor.output and "Traceback" not in floor.output
    assert not (tmp_path / "a.json").exists()
    fast = runner.invoke(app, ["calibrate-denoiser", str(dit_folder), "--speedup", "4", "-o", str(tmp_path / "b.json")])
    assert fast.exit_code == 2 and "4x is not reachable at ratio 0.5" in fast.output, fast.output
    assert not (tmp_path / "b.json").exists()
