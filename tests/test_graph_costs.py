"""Per-block reduction costs counted from an exported graph: hand-built graphs, then a real ToFu export."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from tofu_export.exporters.graph_costs import reduction_costs


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


def test_a_written_out_l2_norm_costs_what_reduce_l2_costs() -> None:
    """TensorRT's importer writes ReduceL2 as a square, a sum and a square root: the same layers as the three ops the
    dynamo exporter writes instead (ONNX Runtime runs those faster), so both count the same kernels."""
    scope = "/blocks/blocks.0/reduce"
    tail = [helper.make_node("Clip", ["n", "eps"], ["c"], name=f"{scope}/Clip"),
            helper.make_node("Div", ["x", "c"], ["y"], name=f"{scope}/Div")]
    fused = [helper.make_node("ReduceL2", ["x"], ["n"], name=f"{scope}/ReduceL2", axes=[-1], keepdims=1), *tail]
    written = [helper.make_node("Mul", ["x", "x"], ["sq"], name=f"{scope}/Mul"),
               helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], name=f"{scope}/ReduceSum", keepdims=1),
               helper.make_node("Sqrt", ["ss"], ["n"], name=f"{scope}/Sqrt"), *tail]
    one, three = reduction_costs(_graph(fused)).blocks[0], reduction_costs(_graph(written)).blocks[0]
    assert one.kernels == three.kernels == 2  # the reduction, then the Clip -> Div chain
    assert (three.nodes, three.pointwise, three.other) == (5, 4, 1)
    square_used_twice = [*written, helper.make_node("Add", ["sq", "x"], ["z"], name=f"{scope}/Add")]
    assert reduction_costs(_graph(square_used_twice)).blocks[0].kernels == 3  # the square is a kernel of its own


def test_a_graph_without_reduction_has_no_blocks() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="/blocks/blocks.0/mlp/act/Relu")]
    costs = reduction_costs(_graph(nodes))
    assert costs.blocks == [] and costs.total.nodes == 0 and costs.render().startswith("no token reduction found")


def test_a_denoisers_dense_tofu_counts_per_sub_layer_without_the_sub_layer() -> None:
    """Dense ToFu's own nodes (``.../attn1/tofu/<op>``) count for the sub-layer's path; the sub-layer it runs on the
    reduced tokens (``tofu/sublayer/...``) does not."""
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="/model/blocks.0/attn1/tofu/TopK"),
             helper.make_node("Softmax", ["v"], ["p"], name="/model/blocks.0/attn1/tofu/sublayer/Softmax"),
             helper.make_node("GatherND", ["p", "i"], ["y"], name="/model/blocks.0/attn1/tofu/GatherND"),
             helper.make_node("GatherND", ["y", "i"], ["z"], name="/model/blocks.0/ff/tofu/GatherND")]
    costs = reduction_costs(_graph(nodes))
    assert [(b.block, b.ops) for b in costs.blocks] == [("model/blocks.0/attn1", {"TopK": 1, "GatherND": 1}),
                                                        ("model/blocks.0/ff", {"GatherND": 1})]
    assert "model/blocks.0/attn1" in costs.render()


@pytest.mark.slow
def test_a_tofu_export_reduces_in_every_block_and_merges_with_pointwise_ops(mixed_tofu_onnx: Path) -> None:
    costs = reduction_costs(mixed_tofu_onnx)  # conftest: 4 blocks, r=3; block 0 prunes, 1-3 merge (MLERP)
    assert [b.block for b in costs.blocks] == [0, 1, 2, 3]
    prune, merge = costs.blocks[0], costs.blocks[1]
    # MLERP adds three norms (sources, kept rows, sums), each Sqrt(ReduceSum(x * x)) and never ONNX Runtime's slower
    # ReduceL2; a simplifier may leave the key normalisation in either block
    assert merge.ops["Sqrt"] - prune.ops.get("Sqrt", 0) == 3
    assert "ReduceL2" not in merge.ops and "ReduceL2" not in prune.ops
    assert prune.kernels < merge.kernels <= 25  # the static reduction's budget (issue 23)
    assert prune.ops["TopK"] == merge.ops["TopK"] == 3  # best match (k=1), edge order, unmerged order
    assert "ReduceMax" not in prune.ops and "ArgMax" not in prune.ops  # the best match is one TopK(k=1)
    assert prune.ops["GatherND"] == 1 and merge.ops["GatherND"] == 2  # [prefix, unmerged, B] in one; the sources
    assert "Concat" not in merge.ops or merge.ops["Concat"] == 1  # only the row indices; no token concat
    assert costs.total.nodes < costs.graph_nodes
