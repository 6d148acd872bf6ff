"""diffusers ``save_pretrained`` folders on the command line: ``tofu-export denoiser DIR`` exports them, the main
command says which command does, pickled weights need ``--trust-pickle``, and without diffusers the error names
the extra."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

from tofu_export.cli.app import app  # noqa: E402
from tofu_export.dense.plan import DensePolicy  # noqa: E402
from tofu_export.errors import UserError  # noqa: E402
from tofu_export.models.diffusers_load import diffusers_class, load_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread


def tiny_unet2d():
    import torch

    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    model = tiny_unet2d()
    model.save_pretrained(root / "safe")
    model.save_pretrained(root / "pickled", safe_serialization=False)
    (root / "pipe").mkdir()
    (root / "pipe" / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    model.save_pretrained(root / "pipe" / "unet")
    return root


def test_denoiser_exports_a_diffusers_folder(folders, tmp_path) -> None:
    out = tmp_path / "art"
    result = CliRunner().invoke(app, ["denoiser", str(folders / "safe"), "--ratio", "0.5", "--mode", "mean",
                                      "--exporter", "torchscript", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "export.json").read_text())
    assert record["parity"]["ok"] and record["tensorrt"]["ok"] and record["input_names"] == ["sample", "timestep"]
    policy = DensePolicy.load(out / "policy.json")
    assert set(policy.blocks) == {"down_blocks.0.attentions.0", "up_blocks.1.attentions.0",
                                  "up_blocks.1.attentions.1"}
    assert {p.mode for p in policy.blocks.values()} == {"mean"}


def test_main_command_names_the_denoiser_command(folders, tmp_path) -> None:
    for folder in (folders / "safe", folders / "pipe"):
        result = CliRunner().invoke(app, ["export", str(folder), "-o", str(tmp_path / "x")])  # `tofu-export DIR`
        assert result.exit_code == 2, result.output
        assert "UNet2DModel folder" in result.output and "tofu-export denoiser" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_pickles_need_trust_and_pipelines_resolve_their_unet(folders, tmp_path) -> None:
    refused = CliRunner().invoke(app, ["denoiser", str(folders / "pickled"), "-o", str(tmp_path / "p")])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and not (tmp_path / "p").exists()
    assert type(load_diffusers(folders / "pickled", trust_pickle=True)).__name__ == "UNet2DModel"
    assert diffusers_class(folders / "pipe") == "UNet2DModel"
    assert type(load_diffusers(folders / "pipe")).__name__ == "UNet2DModel"
    calibrate = CliRunner().invoke(app, ["calibrate-denoiser", str(folders / "safe"), "--speedup", "1.5",
                                         "-o", str(tmp_path / "c.json")])  # refused before any sampling
    assert calibrate.exit_code == 2 and "is not reachable at ratio 0.5" in calibrate.output, calibrate.output
    assert not (tmp_path / "c.json").exists()


def test_without_diffusers_the_error_names_the_extra(folders, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(UserError, match=r"tofu-export\[diffusers\]"):
        load_diffusers(folders / "safe")
