"""A graph's weights set aside while the rest of it is rewritten.

ONNX's opset converter serialises the whole model to hand it to C++ and parses the result back: for a fp32 ViT-L/16
the process's memory rose 4.5 GB during the conversion, four copies of its 1.1 GB of weights, and 0.0 GB with them
set aside (``bench/results/export_memory.md``). Tensors up to ``KEPT_BYTES`` (shapes, axes, scalars, which the
converters read) stay where they are.
"""

from __future__ import annotations

import onnx

KEPT_BYTES = 1024


def set_weights_aside(graph: onnx.ModelProto) -> dict[str, bytes]:
    """Take the ``raw_data`` of every initializer over ``KEPT_BYTES`` out of ``graph`` (its dims and type stay):
    ``{name: bytes}``, for ``put_weights_back``."""
    aside: dict[str, bytes] = {}
    for tensor in graph.graph.initializer:
        if len(tensor.raw_data) > KEPT_BYTES:
            aside[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    return aside


def put_weights_back(graph: onnx.ModelProto, aside: dict[str, bytes]) -> None:
    """Give ``graph``'s initializers the bytes ``set_weights_aside`` took, by name, emptying ``aside`` as it goes
    (one tensor's bytes held twice at a time). Raises if a tensor set aside is no longer in ``graph``."""
    for tensor in graph.graph.initializer:
        if tensor.name in aside:
            tensor.raw_data = aside.pop(tensor.name)
    if aside:
        raise ValueError(f"the rewrite dropped {len(aside)} initializer(s) set aside: {sorted(aside)[:5]}")
