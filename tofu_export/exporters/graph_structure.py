"""An ONNX graph without the names of its intermediate values, to tell whether two exports wrote the same graph.

Two exports of one model can name their values differently (``view`` or ``flatten``, ``val_12`` or ``val_14``) and
still be the same graph node for node. ``graph_structure`` lists every node's type, name, attributes and inputs,
each input named by what makes it: a graph input by its position, an initializer by its content, another node's
output by that node's position and output index. A node name without a ``/`` is not the scope path the exporter
names nodes by (``exporters.dynamo``) but one a later pass took from a value's name (onnxslim names a reshape it
rewrites ``view_37``): it is set aside with the value names.
"""

from __future__ import annotations

import hashlib

import onnx
from onnx import numpy_helper


def graph_structure(model: onnx.ModelProto) -> list[tuple]:
    """``[(op_type, node name, attributes, inputs), ...]`` in graph order, then the graph's outputs."""
    names = {value.name: f"input {i}" for i, value in enumerate(model.graph.input)}
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        names[tensor.name] = f"{array.dtype}{list(array.shape)}:{hashlib.sha1(array.tobytes()).hexdigest()}"
    nodes: list[tuple] = []
    for position, node in enumerate(model.graph.node):
        inputs = tuple(names[name] if name else "" for name in node.input)
        names.update({output: f"{position}.{k}" for k, output in enumerate(node.output)})
        nodes.append((node.op_type, node.name if "/" in node.name else "", str(node.attribute), inputs))
    return [*nodes, tuple(names[value.name] for value in model.graph.output)]
