"""OpenAI / consistency UNet: building, checkpoints, dense ToFu patching, static export of one step."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from safetensors.torch import save_file

from tofu_export.checkpoint import CheckpointError
from tofu_export.dense.export import export_denoiser, static_graph_problems
from tofu_export.dense.plan import BlockPlan, DensePolicy, plan_blocks
from tofu_export.errors import UserError
from tofu_export.exporters.graph_costs import reduction_costs
from tofu_export.models.openai_unet import AttentionBlock
from tofu_export.models.openai_unet_build import build_model, example_inputs, load_openai_unet
from tofu_export.models.openai_unet_config import UNetConfig
from tofu_export.models.openai_unet_tofu import attention_grids, patch, unpatch

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread

CFG = UNetConfig(image_size=16, in_channels=1, out_channels=1, model_channels=32, num_res_blocks=1,
                 attention_resolutions=(8, 4), channel_mult=(1, 2, 2), num_head_channels=32, label="continuous",
                 denoiser="consistency")
NAMES = ["noisy", "sigma", "difficulty"]


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(CFG)
    for p in model.parameters():  # the original zero-initialises output convs; give every layer a say
        p.data.normal_(0, 0.05)
    return model


def run(model: torch.nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(*example_inputs(CFG, batch, seed))


def test_attention_grids_follow_the_stages() -> None:
    grids = attention_grids(tiny())
    assert grids["network.input_blocks.3.1"] == (8, 8) and grids["network.middle_block.1"] == (4, 4)
    assert grids["network.output_blocks.3.1"] == (8, 8)
    assert len(grids) == sum(isinstance(m, AttentionBlock) for m in tiny().modules())


def test_patch_reduces_only_planned_blocks_and_unpatch_restores() -> None:
    model = tiny()
    base = run(model)
    policy = plan_blocks(attention_grids(model), 0.5, "mlerp")
    assert set(policy.blocks) == {"network.input_blocks.3.1", "network.output_blocks.2.1", "network.output_blocks.3.1"}
    patch(model, policy)
    reduced = run(model)
    assert reduced.shape == base.shape and not torch.allclose(reduced, base)
    patch(model, plan_blocks(attention_grids(model), 0.0, "mean"))  # re-patching replaces; r = 0 is exact
    assert torch.equal(run(model), base)
    unpatch(model)
    assert all(m.tofu is None for m in model.modules() if isinstance(m, AttentionBlock))
    with pytest.raises(UserError, match="does not have"):
        patch(model, DensePolicy({"network.input_blocks.1.0": BlockPlan(0.5, "mean")}))


def test_checkpoint_folder_roundtrip_and_errors(tmp_path) -> None:
    model = tiny()
    (tmp_path / "config.json").write_text(CFG.to_json())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["network.input_blocks.3.1.qkv.weight"] = state["network.input_blocks.3.1.qkv.weight"][..., None]  # 2-D
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded, cfg = load_openai_unet(tmp_path)
    assert cfg == CFG and torch.equal(run(loaded), run(model))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"kind": "openai-unet", **json.loads(CFG.to_json()),
                                                 "model_channels": 64} | {"kind": "openai-unet"}))
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit its UNet config"):
        load_openai_unet(bad)
    (bad / "config.json").write_text('{"kind": "openai-unet", "channels": 3}')
    with pytest.raises(UserError, match="unknown keys"):
        load_openai_unet(bad)
    with pytest.raises(UserError, match="no UNet config"):
        load_openai_unet(bad / "model.safetensors", config=tmp_path / "missing.json")


def test_static_graph_problems_flags_data_dependent_ops() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    k = onnx.helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [1])
    nodes = [onnx.helper.make_node("NonZero", ["x"], ["nz"]), onnx.helper.make_node("TopK", ["x", "k"], ["v", "i"])]
    graph = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x, k], []))
    problems = static_graph_problems(graph)
    assert any("NonZero" in p for p in problems) and any("computed K" in p for p in problems)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny()
    patch(model, plan_blocks(attention_grids(model), 0.5, "mlerp", max_downsample=2, seed=3))
    path = tmp_path_factory.mktemp("unet") / "step.onnx"
    result = export_denoiser(model, path, lambda b, s: example_inputs(CFG, b, s), NAMES, exporter="torchscript")
    return model, path, result


def test_export_is_static_verified_and_trt_clean(exported) -> None:
    model, path, result = exported
    graph = onnx.load(str(path))
    assert static_graph_problems(graph) == []
    ops = {n.op_type for n in graph.graph.node}
    tofu_ops = {n.op_type for n in graph.graph.node if "/tofu/" in n.name}
    assert {"TopK", "Gather", "MatMul"} <= tofu_ops  # the reduction: matching, row gathers, one-hot fold
    assert not ops & {"ScatterElements", "ScatterND", "NonZero", "If", "Loop", "RandomUniform", "RandomNormal"}
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert dims == [["batch", 1, 16, 16], ["batch"], ["batch"]]
    assert result.parity is not None and result.parity.ok and result.parity.max_abs_diff < 1e-4
    assert result.tensorrt is not None and result.tensorrt.ok
    costs = reduction_costs(graph)  # `check --costs`: a row per reduced attention block, without the attention
    assert len(costs.blocks) == sum(isinstance(m, AttentionBlock) and m.tofu is not None for m in model.modules())
    assert all(b.ops["TopK"] == 2 and "Softmax" not in b.ops for b in costs.blocks)


def test_export_refuses_a_failed_parity_and_writes_nothing(tmp_path) -> None:
    model = tiny()
    calls = []

    def drifting_inputs(batch: int, seed: int):
        calls.append(batch)
        return example_inputs(CFG, batch, seed)

    class Drift(torch.nn.Module):  # PyTorch output changes after tracing: parity must catch it
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args):
            out = self.inner(*args)
            return out + 1.0 if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() else out

    with pytest.raises(Exception, match="disagrees"):
        export_denoiser(Drift(), tmp_path / "x.onnx", drifting_inputs, NAMES, exporter="torchscript",
                        simplify=False, trt_check=False)
    assert not (tmp_path / "x.onnx").exists() and calls
