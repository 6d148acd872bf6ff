"""Per-block reduction costs counted from an exported graph: hand-built graphs, then a real ToFu export."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper

import tofu_export
from tofu_export.exporters.graph_costs import reduction_costs
from tofu_export.exporters.onnx import export_onnx


def _graph(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_nodes_are_split_into_pointwise_chains_shape_ops_and_the_rest() -> None:
    scope = "/blocks/blocks.2/reduce"
    nodes = [
        helper.make_node("Relu", ["x"], ["unscoped"], name="Relu_7"),  # renamed by a simplifier: feeds block 2 only
        helper.make_node("Mul", ["unscoped", "x"], ["m"], name=f"{scope}/Mul"),
        helper.make_node("Add", ["m", "x"], ["a"], name=f"{scope}/Add"),  # chain Relu -> Mul -> Add: one kernel
        helper.make_node("Reshape", ["a", "shape"], ["r"], name=f"{scope}/Reshape"),
        helper.make_node("TopK", ["r", "k"], ["v", "i"], name=f"{scope}/TopK"),
        helper.make_node("Sub", ["v", "x"], ["s"], name=f"{scope}/Sub"),  # a second pointwise chain
        helper.make_node("Add", ["s", "x"], ["y"], name="/blocks/blocks.2/Add"),  # the block's residual: not counted
    ]
    costs = reduction_costs(_graph(nodes))
    assert [b.block for b in costs.blocks] == [2]
    block = costs.blocks[0]
    assert (block.nodes, block.pointwise, block.shape, block.other) == (6, 4, 1, 1)
    assert block.kernels == 1 + 2  # TopK, plus the two pointwise chains
    assert block.ops == {"Relu": 1, "Mul": 1, "Add": 1, "Reshape": 1, "TopK": 1, "Sub": 1}
    assert costs.graph_nodes == 7
    assert "TopK 1" in costs.render()


def test_a_graph_without_reduction_has_no_blocks() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="/blocks/blocks.0/mlp/act/Relu")]
    costs = reduction_costs(_graph(nodes))
    assert costs.blocks == [] and costs.total.nodes == 0


@pytest.mark.slow
def test_a_tofu_export_reduces_in_every_block_and_merges_with_pointwise_ops(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=4, img_size=64).eval()
    tofu_export.patch(model, r=3, mode="tofu", prune_layers=1, img_size=64)  # block 0 prunes, 1-3 merge (MLERP)
    export_onnx(model, tmp_path / "m.onnx", 64)
    costs = reduction_costs(tmp_path / "m.onnx")
    assert [b.block for b in costs.blocks] == [0, 1, 2, 3]
    prune, merge = costs.blocks[0], costs.blocks[1]
    # MLERP adds three norms (sources, destinations, group sums); a simplifier may leave the key normalisation in
    # either block
    assert merge.ops["ReduceL2"] - prune.ops.get("ReduceL2", 0) == 3
    # Issue 23 asks for ~25; the fold on the r sources alone costs ~10 more small kernels than the one-hot fold over
    # every token did (25), in exchange for no full-width norm, rescale or matmul (faster on ORT CPU: see
    # bench/results/latency_deit_small_thread_cpu.md). This bound only catches a further regression.
    assert prune.kernels < merge.kernels <= 35
    assert prune.ops["TopK"] == merge.ops["TopK"] == 3  # best match (k=1), edge order, unmerged order
    assert "ReduceMax" not in prune.ops and "ArgMax" not in prune.ops  # the best match is one TopK(k=1)
    assert prune.ops["Gather"] == 1  # [prefix, unmerged, B] in one row gather straight from x
    assert merge.ops["Gather"] == 4  # sources, destinations, then [prefix, unmerged, B | merged]; sizes are all 1
    assert costs.blocks[2].ops["Gather"] == 6  # the same three for the sizes
    assert merge.ops["Concat"] == 3  # the output positions, [x, merged] and [sizes, merged sizes]
    assert not {"GatherND", "ScatterND", "ScatterElements", "NonZero"} & set(costs.total.ops)
    assert costs.total.nodes < costs.graph_nodes


@pytest.mark.slow
def test_mlerp_norms_and_rescale_touch_only_the_r_merged_rows(tmp_path: Path) -> None:
    """Every norm of the merge (not the key normalisation) and the rescale run on r rows, never on all tokens."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    tofu_export.patch(model, r=3, mode="mlerp", img_size=64)  # 17 tokens enter block 0, 14 block 1
    export_onnx(model, tmp_path / "m.onnx", 64)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "m.onnx"))).graph
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.value_info}
    norms = [n for n in graph.node if n.op_type == "ReduceL2" and "/reduce" in n.name]
    token_norms = [dims[n.input[0]] for n in norms if dims[n.input[0]][-1] == 192]  # 192 channels: tokens, not keys
    assert len(token_norms) == 2 * 3  # per block: sources, destinations, group sums
    assert all(shape[1] == 3 for shape in token_norms), token_norms  # r rows, not the 14-17 tokens
