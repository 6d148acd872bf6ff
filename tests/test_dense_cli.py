"""``tofu-export denoiser`` / ``calibrate-denoiser`` on a tiny consistency UNet checkpoint folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tofu_export.cli.app import app
from tofu_export.dense.plan import DensePolicy
from tofu_export.models.openai_unet_build import build_model
from tofu_export.models.openai_unet_config import UNetConfig

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread

CFG = UNetConfig(image_size=16, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1,
                 attention_resolutions=(8,), channel_mult=(1, 2), num_head_channels=32, label="continuous",
                 denoiser="consistency")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model(CFG)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    (folder / "config.json").write_text(CFG.to_json())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def test_calibrate_then_export_with_the_policy(checkpoint, tmp_path) -> None:
    runner = CliRunner()
    policy = tmp_path / "policy.json"
    result = runner.invoke(app, ["calibrate-denoiser", str(checkpoint), "--ratio", "0.5", "--samples", "1",
                                 "-o", str(policy)])  # --measure: test_denoiser_calibrate.py (family-agnostic)
    assert result.exit_code == 0, result.output
    loaded = DensePolicy.load(policy)
    assert set(loaded.blocks) == {"network.input_blocks.3.1", "network.middle_block.1",
                                  "network.output_blocks.0.1", "network.output_blocks.1.1"}
    assert loaded.notes["runs"] >= 3 + len(loaded.blocks) * 2
    counted = f"denoiser calibration: sampling runs of 1 samples, 4 blocks: {loaded.notes['runs']} done"
    assert counted in result.output  # each run (minutes on a real UNet) counted where a log can see it
    assert loaded.notes["family"] == "openai-unet" and "sigma 80" in loaded.notes["sampler"]
    assert "measured" not in loaded.notes and "PSNR" in result.output
    out = tmp_path / "art"
    result = runner.invoke(app, ["denoiser", str(checkpoint), "--policy", str(policy), "--exporter", "torchscript",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "parity (ORT vs PyTorch)" in result.output and "pass:" in result.output and "TensorRT 10" in result.output
    record = json.loads((out / "export.json").read_text())
    assert record["parity"]["ok"] and record["tensorrt"]["ok"] and record["input_names"] == ["sample", "sigma",
                                                                                             "label"]
    assert DensePolicy.load(out / "policy.json") == loaded
    DensePolicy.check_output(policy)  # a policy it wrote: a new calibration may replace it
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    again = runner.invoke(app, ["calibrate-denoiser", str(checkpoint), "-o", str(notes)])  # refused before any work
    assert again.exit_code == 2 and "not a tofu-export denoiser policy" in " ".join(again.output.split())
    assert notes.read_text() == '{"mine": true}'


def test_bad_inputs_are_one_line_errors(checkpoint, tmp_path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["denoiser", str(tmp_path / "nope"), "-o", str(tmp_path / "a")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad_mode = runner.invoke(app, ["denoiser", str(checkpoint), "--mode", "avg", "-o", str(tmp_path / "b")])
    assert bad_mode.exit_code == 2 and "unknown reduce mode" in bad_mode.output
    assert not (tmp_path / "b").exists()
    diffusers_dir = tmp_path / "unet"
    diffusers_dir.mkdir()
    (diffusers_dir / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    refused = runner.invoke(app, ["denoiser", str(diffusers_dir), "-o", str(tmp_path / "c")])
    assert refused.exit_code == 2 and "diffusers" in refused.output
    encoder = tmp_path / "dinov2"  # an image encoder's folder: sent to the main command, not told it lacks a UNet
    encoder.mkdir()
    (encoder / "config.json").write_text('{"architectures": ["Dinov2Model"], "model_type": "dinov2"}')
    sent = runner.invoke(app, ["denoiser", str(encoder), "-o", str(tmp_path / "d")])
    said = " ".join(sent.output.split())
    assert sent.exit_code == 2 and "a transformers Dinov2Model folder: an image encoder" in said
    assert not (tmp_path / "d").exists()
    timm_hub = tmp_path / "vit"  # timm's hub layout: its config names one architecture
    timm_hub.mkdir()
    (timm_hub / "config.json").write_text('{"architecture": "vit_small_patch16_224", "num_classes": 1000}')
    sent = runner.invoke(app, ["denoiser", str(timm_hub), "-o", str(tmp_path / "e")])
    said = " ".join(sent.output.split())
    assert sent.exit_code == 2 and "a timm vit_small_patch16_224 folder: an image encoder" in said


def test_unreachable_speedup_is_an_error_naming_the_reachable_one(checkpoint, tmp_path) -> None:
    policy = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["calibrate-denoiser", str(checkpoint), "--ratio", "0.5", "--speedup", "3",
                                      "--samples", "1", "-o", str(policy)])
    assert result.exit_code == 2, result.output
    assert "3x is not reachable at ratio 0.5" in result.output and "--speedup 1.0" in result.output
    assert not policy.exists()
