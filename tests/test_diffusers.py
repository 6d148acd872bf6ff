"""Dense ToFu in tiny random diffusers denoisers (built from configs, no downloads): UNet2DConditionModel, DiT and
PixArt transformers; patch / unpatch, and a static export of one UNet2DConditionModel and one DiT step."""

from __future__ import annotations

import re

import onnx
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tofu_export.dense.export import export_denoiser, static_graph_problems  # noqa: E402
from tofu_export.dense.plan import plan_blocks  # noqa: E402
from tofu_export.exporters.graph_costs import reduction_costs  # noqa: E402
from tofu_export.models.diffusers_blocks import ATTRIBUTES  # noqa: E402
from tofu_export.models.diffusers_denoiser import input_names, patch, step, step_inputs, token_grids  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread


def unet() -> torch.nn.Module:
    """Cross-attention at 16x16 down and up, an upsampler between; no mid-block (``plan_blocks`` reduces only the
    finest grid by default, so its 8x8 transformer would be exported unreduced: 23% of the export's time)."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()


def dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                           num_embeds_ada_norm=10).eval()


def pixart() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=16, patch_size=2,
                                              cross_attention_dim=32, caption_channels=32).eval()


def test_static_upsample_equals_diffusers_upsample() -> None:
    from diffusers.models.upsampling import Upsample2D

    from tofu_export.models.diffusers_static import StaticUpsample2D, make_static, undo_static

    torch.manual_seed(0)
    holder = torch.nn.Sequential(Upsample2D(8, use_conv=True))
    x = torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        expected = holder(x)
        make_static(holder)
        assert isinstance(holder[0], StaticUpsample2D)
        assert torch.equal(holder(x), expected)
        assert holder[0](x, output_size=(9, 7)).shape == (2, 8, 9, 7)  # an explicit size goes to diffusers' own
        undo_static(holder)
    assert isinstance(holder[0], Upsample2D)


def _scope(path: str) -> str:
    """``down_blocks.0.attentions.0`` -> ``down_blocks.0/attentions.0``: a module path as node names write it."""
    return re.sub(r"\.(?!\d)", "/", path)


@pytest.mark.slow
@pytest.mark.parametrize(("build", "exporter", "opset", "sublayers"), [
    (unet, "dynamo", 17, "self,cross,mlp"), (unet, "torchscript", 16, "self"), (dit, "dynamo", 16, "self,mlp"),
    (pixart, "dynamo", 17, "self")])
def test_static_export_passes_the_tensorrt_check(build, exporter: str, opset: int, sublayers: str, tmp_path) -> None:
    """Static, verified, and clean on the TensorRT releases the opset is for (17: TensorRT 10; 16: 8.5 and 10):
    the export's own check raises otherwise; the report is re-read here so a failure names its nodes. With
    ``sublayers`` beyond self-attention, the block's one shared matching is traced once (one TopK pair a block)."""
    from tofu_export.dense.export import trt_targets_for
    from tofu_export.tensorrt.check import check_tensorrt_compat

    model = build()
    make = step_inputs(model, 16)
    grids = token_grids(model, make(1, 0))
    patch(model, plan_blocks(grids, 0.5, "mlerp", sublayers=sublayers), grids)
    result = export_denoiser(step(model), tmp_path / "step.onnx", make, input_names(model), exporter=exporter,
                             opset=opset)
    graph = onnx.load(str(tmp_path / "step.onnx"))
    assert static_graph_problems(graph) == []
    topk = sum(n.op_type == "TopK" for n in graph.graph.node)
    assert topk == 2 * len(plan_blocks(grids, 0.5, "mlerp").blocks)
    assert "Resize" not in {n.op_type for n in graph.graph.node}
    assert result.parity.ok, result.parity
    assert result.tensorrt.ok and result.tensorrt.build_for == list(trt_targets_for(opset))
    report = check_tensorrt_compat(tmp_path / "step.onnx", targets=trt_targets_for(opset))
    assert report.ok, report.render()
    assert not [i for i in report.issues if "symbolic shape inference failed" in i.message]
    costs = reduction_costs(graph)  # `check --costs`: a row per reduced sub-layer, the matching in the first's
    reduced = {f"model/{_scope(block)}/{ATTRIBUTES[name]}" for block in plan_blocks(grids, 0.5, "mlerp").blocks
               for name in sublayers.split(",") if getattr(model.get_submodule(block), ATTRIBUTES[name], None)}
    assert {b.block for b in costs.blocks} == reduced and costs.total.ops["TopK"] == topk
    assert not any({"Softmax", "Gemm"} & set(b.ops) for b in costs.blocks)  # the sub-layers themselves: not counted
