"""torch's graph optimiser without onnxscript's ``SlicesSplit`` rule (``exporters.optimiser_rules``): the rule is left
out only inside ``rewrite_rules_without``, and a ToFu graph optimised without it is byte for byte the graph optimised
with it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript import rewriter
from onnxscript.optimizer import optimize_ir

from tofu_export import patch
from tofu_export.exporters import dynamo
from tofu_export.exporters.optimiser_rules import rewrite_rules_without

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread


def _halves() -> onnx.ModelProto:
    """``[2, 8] -> [2, 8]``: the two halves of the last axis swapped, as two ``Slice`` nodes without steps (the form
    ``SlicesSplit`` rewrites; torch's exporter writes every ``Slice`` with its steps)."""
    constants = {name: numpy_helper.from_array(np.array(value, np.int64), name)
                 for name, value in {"zero": [0], "half": [4], "end": [8], "axis": [-1]}.items()}
    nodes = [helper.make_node("Slice", ["x", "half", "end", "axis"], ["high"]),  # first: the rule's matcher tries
             helper.make_node("Slice", ["x", "zero", "half", "axis"], ["low"]),  # the first structural match only
             helper.make_node("Concat", ["high", "low"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "halves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              list(constants.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _unoptimised(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """``model`` through torch's dynamo exporter with our translations, before any graph optimisation."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    return torch.onnx.export(model, (x,), dynamo=True, opset_version=dynamo.EXPORT_OPSET, dynamic_shapes=shapes,
                             custom_translation_table=dynamo.translation_table(17), optimize=False,
                             verbose=False).model_proto


def _optimised(graph: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.from_proto(graph)
    optimize_ir(model)
    return ir.to_proto(model)


def _ops(graph: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in graph.graph.node]


def test_the_rule_is_left_out_only_inside_the_block() -> None:
    graph = _halves()
    assert _ops(_optimised(graph)).count("Split") == 1  # the rule, as onnxscript applies it
    rules = rewriter._DEFAULT_REWRITE_RULES
    with rewrite_rules_without():
        assert len(rewriter._DEFAULT_REWRITE_RULES) == len(rules) - 1
        inside = _ops(_optimised(graph))
    assert (inside.count("Slice"), inside.count("Split")) == (2, 0)
    assert rewriter._DEFAULT_REWRITE_RULES is rules  # restored
    assert _ops(_optimised(graph)).count("Split") == 1


def test_a_tofu_graph_is_the_same_without_the_rule(make_vit, make_images) -> None:
    """Every ToFu mode's reduction (bipartite split, gathers, merge matmul, norms) in two blocks, pruning in one."""
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=32)
    with pytest.warns(UserWarning, match=r"blocks \[0, 1\] were clipped"):  # 5 tokens: at most 2 a block
        patch(model, r=3, mode="tofu", prune_layers=1, img_size=32)
    graph = _unoptimised(model, make_images(2, 32))
    with_rule = _optimised(graph)
    with rewrite_rules_without():
        without = _optimised(graph)
    assert len(with_rule.graph.node) > 100
    assert with_rule.SerializeToString() == without.SerializeToString()
