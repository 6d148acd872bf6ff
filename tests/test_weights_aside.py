"""The opset conversion runs on a graph whose weights were set aside (``exporters.weights_aside``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tofu_export.exporters import dynamo
from tofu_export.exporters.weights_aside import KEPT_BYTES, put_weights_back, set_weights_aside


def _graph() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "weight")
    shape = numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                              initializer=[weight, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_large_tensors_are_set_aside_and_put_back_by_name() -> None:
    graph = _graph()
    before = graph.SerializeToString()
    aside = set_weights_aside(graph)
    assert list(aside) == ["weight"] and len(aside["weight"]) == 64 * 64 * 4 > KEPT_BYTES  # the shape stays
    assert graph.graph.initializer[0].raw_data == b"" and list(graph.graph.initializer[0].dims) == [64, 64]
    put_weights_back(graph, aside)
    assert graph.SerializeToString() == before and aside == {}
    aside = set_weights_aside(graph)
    del graph.graph.initializer[0]
    with pytest.raises(ValueError, match="dropped 1 initializer"):
        put_weights_back(graph, aside)


def test_converting_without_the_weights_gives_the_graph_converting_with_them_gives(
    mixed_tofu_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ToFu graph at the dynamo exporter's opset 18 (the shared export, converted up) brought down to 17."""
    at_18 = onnx.version_converter.convert_version(onnx.load(str(mixed_tofu_onnx)), dynamo.EXPORT_OPSET)
    assert len(set_weights_aside(onnx.ModelProto.FromString(at_18.SerializeToString()))) > 10  # not vacuous
    lean = dynamo._convert_down(onnx.ModelProto.FromString(at_18.SerializeToString()), 17)
    monkeypatch.setattr(dynamo, "set_weights_aside", lambda graph: {})  # the converter given every weight
    whole = dynamo._convert_down(at_18, 17)
    assert lean.opset_import[0].version == 17
    assert lean.SerializeToString() == whole.SerializeToString()
