"""Per-operator TensorRT restrictions (attributes, constant inputs, used outputs) and the graph lookups they need.

``RESTRICTIONS[op_type]`` lists checks ``(node, graph) -> [(targets, message)]``; ``check`` turns each
violation into an error for the requested targets it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from tofu_export.tensorrt.issues import Severity, TrtIssue
from tofu_export.tensorrt.ops import (
    ALL_TARGETS,
    CONSTANT_INPUTS,
    RESIZE_COORDINATE_MODES,
    RESIZE_MODES,
    TOPK_MAX_K,
)

Violation = tuple[tuple[str, ...], str]  # (targets it applies to, message)


def for_targets(targets: Iterable[str], severity: Severity, op_type: str, node: str, message: str) -> list[TrtIssue]:
    """The same finding, once per target."""
    return [TrtIssue(severity, target, op_type, node, message) for target in targets]


@dataclass(frozen=True)
class GraphIndex:
    """Lookups over one graph: constant values, consumers and inferred ranks of tensors."""

    graph: onnx.GraphProto
    constants: dict[str, np.ndarray]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]
    ranks: dict[str, int]

    @staticmethod
    def build(graph: onnx.GraphProto) -> GraphIndex:
        constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = _constant_node_value(node)
                if value is not None:
                    constants[node.output[0]] = value
            for index, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node, index))
        ranks = {
            info.name: len(info.type.tensor_type.shape.dim)
            for info in [*graph.input, *graph.output, *graph.value_info]
            if info.type.tensor_type.HasField("shape")
        }
        return GraphIndex(graph=graph, constants=constants, consumers=consumers, ranks=ranks)


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_int", "value_ints"):
            return np.asarray(onnx.helper.get_attribute_value(attribute), dtype=np.int64)
        if attribute.name in ("value_float", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attribute), dtype=np.float32)
    return None


def _scatter_reduction(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    reduction = _attribute(node, "reduction", "none")
    if reduction == "none":
        return []
    message = f"reduction='{reduction}' is not native (8.5: unsupported; 10.x: plugin or unsupported)"
    return [(ALL_TARGETS, message)]


def _topk_k(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    violations: list[Violation] = []
    k = graph.constants.get(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(np.max(k)) > TOPK_MAX_K:
        violations.append((ALL_TARGETS, f"K={int(np.max(k))} exceeds TensorRT's TopK limit of {TOPK_MAX_K}"))
    if _attribute(node, "sorted", 1) != 1:
        violations.append((("10",), "sorted=0 is not supported (must be 1)"))
    return violations


def _resize_modes(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    violations: list[Violation] = []
    mode = _attribute(node, "mode", "nearest")
    if mode not in RESIZE_MODES:
        violations.append((ALL_TARGETS, f"mode='{mode}' unsupported (only {sorted(RESIZE_MODES)})"))
    coordinates = _attribute(node, "coordinate_transformation_mode", "half_pixel")
    if coordinates not in RESIZE_COORDINATE_MODES:
        violations.append((ALL_TARGETS, f"coordinate_transformation_mode='{coordinates}' unsupported"))
    if _attribute(node, "antialias", 0):
        violations.append((ALL_TARGETS, "antialias=1 is not supported"))
    return violations


def _grid_sample_rank(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    rank = graph.ranks.get(node.input[0])
    if rank is None or rank == 4:
        return []
    return [(ALL_TARGETS, f"input must be 4-D, got rank {rank}")]


def _first_output_only(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    used = [output for output in node.output[1:] if output and output in graph.consumers]
    used += [output.name for output in graph.graph.output if output.name in node.output[1:]]
    if not used:
        return []
    return [(ALL_TARGETS, f"only the first output is supported, but {sorted(set(used))} is used")]


def _constant_inputs(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    violations: list[Violation] = []
    for (op_type, index, input_name), targets in CONSTANT_INPUTS.items():
        if op_type != node.op_type or len(node.input) <= index or not node.input[index]:
            continue
        if node.input[index] not in graph.constants:
            violations.append((targets, f"input '{input_name}' must be a build-time constant (initializer)"))
    return violations


def _symmetric_int8(node: onnx.NodeProto, graph: GraphIndex) -> list[Violation]:
    """TensorRT's explicit quantization is symmetric INT8 (also FP8/INT4, not made here): zero point 0 of type INT8."""
    zero_point = graph.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is None or (zero_point.dtype == np.int8 and not zero_point.any()):
        return []
    return [(ALL_TARGETS, f"zero point of type {zero_point.dtype} (values {zero_point.min()}..{zero_point.max()}): "
             "TensorRT takes only symmetric INT8 (zero point 0); this graph was quantized for ONNX Runtime CPU "
             "(UINT8 activations); export it with symmetric INT8 for TensorRT")]  # fmt: skip


RESTRICTIONS: dict[str, tuple[Callable[[onnx.NodeProto, GraphIndex], list[Violation]], ...]] = {
    "ScatterElements": (_scatter_reduction,),
    "ScatterND": (_scatter_reduction,),
    "TopK": (_topk_k, _constant_inputs),
    "Resize": (_resize_modes,),
    "GridSample": (_grid_sample_rank,),
    "MaxPool": (_first_output_only,),
    "LayerNormalization": (_first_output_only,),
    "Slice": (_constant_inputs,),
    "Squeeze": (_constant_inputs,),
    "Unsqueeze": (_constant_inputs,),
    "CumSum": (_constant_inputs,),
    "QuantizeLinear": (_symmetric_int8,),
    "DequantizeLinear": (_symmetric_int8,),
}
