"""GPU-free check that an ONNX graph builds as a TensorRT engine natively (no plugins) on Jetson.

Answers, from the ONNX file alone, "will the TensorRT ONNX parser of JetPack 5 (TensorRT 8.5) and
JetPack 6 (TensorRT 10.x) take this graph, with only the batch axis dynamic?": operator support per TensorRT
version, the per-operator restrictions that matter for exported ViTs, static shapes, and dtypes TensorRT
cannot represent.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto

from tofu_export.errors import UserError
from tofu_export.exporters.trt_ops import (
    CASTS_INT64_TO_INT32,
    DATA_DEPENDENT_OPS,
    MAX_OPSET,
    MIN_OPSET,
    NATIVE_OPS,
    TARGET_LABELS,
    UNSUPPORTED_OP_HINTS,
)
from tofu_export.exporters.trt_rules import RESTRICTIONS, GraphIndex

# Slice starts/ends hold INT64_MAX for "to the end"; clamping them to INT32 keeps their meaning.
_CLAMP_SAFE_INPUTS = frozenset({("Slice", 1), ("Slice", 2)})
_INT32 = np.iinfo(np.int32)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RENDER_MAX_ISSUES = 25

Severity = Literal["error", "warning"]


class UnknownTrtTargetError(UserError, ValueError):
    """A requested TensorRT target is not one this checker has an operator table for."""


@dataclass(frozen=True)
class TrtIssue:
    """One reason the graph may not build natively on one target; ``node`` is a node or tensor name."""

    severity: Severity
    target: str
    op_type: str
    node: str
    message: str


@dataclass
class TrtCompatReport:
    """Verdict of :func:`check_tensorrt_compat` for every requested target."""

    targets: tuple[str, ...]
    opset: int
    op_counts: dict[str, int]
    issues: list[TrtIssue] = field(default_factory=list)

    @property
    def per_target(self) -> dict[str, bool]:
        """``target -> True`` when that target has no error (warnings allowed)."""
        failing = {issue.target for issue in self.issues if issue.severity == "error"}
        return {target: target not in failing for target in self.targets}

    @property
    def ok(self) -> bool:
        """True when no requested target has an error."""
        return all(self.per_target.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: verdicts, opset, op counts and issues."""
        return {
            "ok": self.ok,
            "targets": list(self.targets),
            "per_target": self.per_target,
            "opset": self.opset,
            "op_counts": dict(self.op_counts),
            "issues": [asdict(issue) for issue in self.issues],
        }

    def render(self) -> str:
        """Short human verdict: one line per target, then the issues (shared ones listed once)."""
        lines = [_verdict_line(target, self.issues) for target in self.targets]
        lines.append(f"opset {self.opset}, {sum(self.op_counts.values())} nodes")
        grouped: dict[tuple[str, str, str, str], list[str]] = {}
        for issue in self.issues:
            key = (issue.severity, issue.op_type, issue.node, issue.message)
            grouped.setdefault(key, []).append(issue.target)
        for (severity, op_type, node, message), targets in list(grouped.items())[:_RENDER_MAX_ISSUES]:
            where = f"{op_type} '{node}'" if op_type else f"'{node}'"
            lines.append(f"  [{severity}] {', '.join(targets)}: {where}: {message}")
        if len(grouped) > _RENDER_MAX_ISSUES:
            lines.append(f"  ... and {len(grouped) - _RENDER_MAX_ISSUES} more (see to_dict())")
        return "\n".join(lines)


def check_tensorrt_compat(
    model: onnx.ModelProto | str | Path, targets: Sequence[str] = ("8.5", "10")
) -> TrtCompatReport:
    """Check ``model`` against the native ONNX support of each TensorRT ``targets`` version.

    Errors: unsupported or custom-domain ops, data-dependent control flow/shapes, attribute restrictions,
    opset out of range, any dynamic dim other than the leading batch axis, DOUBLE tensors, INT64 constants
    that do not fit INT32 on targets that cast down. Warnings: INT64 graph inputs.
    """
    targets = _validate_targets(targets)
    proto = onnx.load(str(model)) if isinstance(model, str | Path) else model
    opset = _default_opset(proto)
    inferred, inference_issues = _infer_shapes(proto, targets)
    graph = GraphIndex.build(inferred.graph)
    issues = [
        *inference_issues,
        *_opset_issues(opset, targets),
        *_op_issues(graph, targets),
        *_shape_issues(inferred.graph, targets),
        *_dtype_issues(graph, targets),
    ]
    op_counts = dict(sorted(Counter(node.op_type for node in inferred.graph.node).items()))
    return TrtCompatReport(targets=targets, opset=opset, op_counts=op_counts, issues=issues)



def _validate_targets(targets: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(str(target) for target in targets))
    unknown = [target for target in chosen if target not in NATIVE_OPS]
    if unknown or not chosen:
        raise UnknownTrtTargetError(
            f"Unknown TensorRT target(s) {unknown or list(targets)}: this checker has operator tables for "
            f"{sorted(NATIVE_OPS)} ({', '.join(TARGET_LABELS.values())}). Pass one or more of those."
        )
    return chosen


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    return max(versions, default=0)


def _issues(targets: Iterable[str], severity: Severity, op_type: str, node: str, message: str) -> list[TrtIssue]:
    return [TrtIssue(severity, target, op_type, node, message) for target in targets]


def _infer_shapes(model: onnx.ModelProto, targets: tuple[str, ...]) -> tuple[onnx.ModelProto, list[TrtIssue]]:
    """Symbolic shape inference (follows Shape/Gather/Concat arithmetic, keeps ``batch`` symbolic)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _inside_temporary_directory():  # on failure it dumps sym_shape_infer_temp.onnx into the cwd
            inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
        if inferred is not None:
            return inferred, []
        reason = "it returned no model"
    except Exception as error:  # an op it cannot follow, or onnxruntime missing
        reason = f"{type(error).__name__}: {error}"
    fallback = onnx.shape_inference.infer_shapes(model, data_prop=True)
    message = (
        f"symbolic shape inference failed ({reason}); fell back to ONNX shape inference, which cannot follow "
        "shape arithmetic, so unknown dims reported below may be false alarms"
    )
    return fallback, _issues(targets, "warning", "", model.graph.name, message)


@contextmanager
def _inside_temporary_directory() -> Iterator[None]:
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="tofu-shape-infer-") as directory:
        os.chdir(directory)
        try:
            yield
        finally:
            os.chdir(previous)


def _opset_issues(opset: int, targets: tuple[str, ...]) -> list[TrtIssue]:
    issues = []
    if opset < MIN_OPSET:
        message = f"opset {opset} < {MIN_OPSET}; re-export with opset 16 (or 17 for TensorRT 10 only)"
        issues += _issues(targets, "error", "", "opset", message)
    for target in targets:
        if opset > MAX_OPSET[target]:
            message = f"opset {opset} > {MAX_OPSET[target]}, the newest {TARGET_LABELS[target]} parses"
            issues += _issues([target], "error", "", "opset", message)
    return issues


def _op_issues(graph: GraphIndex, targets: tuple[str, ...]) -> list[TrtIssue]:
    issues: list[TrtIssue] = []
    for position, node in enumerate(graph.graph.node):
        name = node.name or f"{node.op_type}#{position}"
        if node.domain not in ("", "ai.onnx"):
            message = f"custom-domain op '{node.domain}::{node.op_type}' needs a TensorRT plugin"
            issues += _issues(targets, "error", node.op_type, name, message)
            continue
        if node.op_type in DATA_DEPENDENT_OPS:
            message = "data-dependent control flow/shapes cannot form a static-shape engine"
            issues += _issues(targets, "error", node.op_type, name, message)
            continue
        missing = [target for target in targets if node.op_type not in NATIVE_OPS[target]]
        hint = UNSUPPORTED_OP_HINTS.get(node.op_type)
        message = "op has no native TensorRT importer" + (f" ({hint})" if hint else "")
        issues += _issues(missing, "error", node.op_type, name, message)
        for restriction in RESTRICTIONS.get(node.op_type, ()):
            for restricted_targets, message in restriction(node, graph):
                applicable = [target for target in targets if target in restricted_targets]
                issues += _issues(applicable, "error", node.op_type, name, message)
    return issues



def _shape_issues(graph: onnx.GraphProto, targets: tuple[str, ...]) -> list[TrtIssue]:
    """Only axis 0 of graph inputs may be symbolic; every other dim must be static or an expression of it."""
    initializers = {init.name for init in graph.initializer}
    inputs = [info for info in graph.input if info.name not in initializers]
    batch_symbols = {
        info.type.tensor_type.shape.dim[0].dim_param
        for info in inputs
        if len(info.type.tensor_type.shape.dim) > 0 and info.type.tensor_type.shape.dim[0].dim_param
    }
    issues: list[TrtIssue] = []
    for info in [*inputs, *graph.output]:
        problem = _io_dims_problem(info, batch_symbols)
        if problem:
            issues += _issues(targets, "error", "", info.name, problem)
    for info in graph.value_info:
        problem = _intermediate_dims_problem(info, batch_symbols)
        if problem:
            issues += _issues(targets, "error", "", info.name, problem)
    return issues


def _dims(info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims as ints (static), strings (symbolic) or None (unknown); None for an unknown rank."""
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in dims]


def _is_batch_expression(dim: int | str | None, batch_symbols: set[str]) -> bool:
    if isinstance(dim, int):
        return True
    return dim is not None and set(_IDENTIFIER.findall(dim)) <= batch_symbols


def _io_dims_problem(info: onnx.ValueInfoProto, batch_symbols: set[str]) -> str | None:
    dims = _dims(info)
    if dims is None:
        return "graph input/output has no shape"
    for axis, dim in enumerate(dims):
        if dim is None:
            return f"axis {axis} is unknown; graph inputs/outputs must be static except the batch axis 0"
        if axis > 0 and not isinstance(dim, int):
            return f"axis {axis} is symbolic ('{dim}'); only axis 0 (batch) may be dynamic"
        if axis == 0 and not _is_batch_expression(dim, batch_symbols):
            return f"axis 0 is '{dim}', not the batch symbol(s) {sorted(batch_symbols)} of the graph inputs"
    return None


def _intermediate_dims_problem(info: onnx.ValueInfoProto, batch_symbols: set[str]) -> str | None:
    dims = _dims(info)
    if dims is None:
        return "shape could not be inferred"
    for axis, dim in enumerate(dims):
        if not _is_batch_expression(dim, batch_symbols):
            shown = "unknown" if dim is None else f"'{dim}'"
            return f"axis {axis} is {shown}: neither static nor derived from the batch axis"
    return None


def _dtype_issues(graph: GraphIndex, targets: tuple[str, ...]) -> list[TrtIssue]:
    issues: list[TrtIssue] = []
    initializers = {init.name for init in graph.graph.initializer}
    typed = [*graph.graph.input, *graph.graph.output, *graph.graph.value_info]
    doubles = {info.name for info in typed if info.type.tensor_type.elem_type == TensorProto.DOUBLE}
    doubles |= {name for name, value in graph.constants.items() if value.dtype == np.float64}
    for name in sorted(doubles):
        issues += _issues(targets, "error", "", name, "DOUBLE tensor: cast to float32 before export")
    for info in graph.graph.input:
        if info.name not in initializers and info.type.tensor_type.elem_type == TensorProto.INT64:
            message = "INT64 graph input: 8.5 binds it as INT32, 10.x needs an INT64 buffer"
            issues += _issues(targets, "warning", "", info.name, message)
    casting = [target for target in targets if CASTS_INT64_TO_INT32[target]]
    for name, value in graph.constants.items():
        if value.dtype != np.int64 or value.size == 0 or _clamp_is_exact(name, graph):
            continue
        if value.min() < _INT32.min or value.max() > _INT32.max:
            message = f"INT64 constant outside INT32 range ({value.min()}..{value.max()}) would be clamped"
            issues += _issues(casting, "error", "", name, message)
    return issues


def _clamp_is_exact(name: str, graph: GraphIndex) -> bool:
    consumers = graph.consumers.get(name, [])
    return bool(consumers) and all((node.op_type, index) in _CLAMP_SAFE_INPUTS for node, index in consumers)


def _verdict_line(target: str, issues: list[TrtIssue]) -> str:
    errors = sum(issue.target == target and issue.severity == "error" for issue in issues)
    warnings = sum(issue.target == target and issue.severity == "warning" for issue in issues)
    verdict = f"FAIL ({errors} error{'s' * (errors != 1)})" if errors else "OK"
    if warnings:
        verdict += f" ({warnings} warning{'s' * (warnings != 1)})"
    return f"{TARGET_LABELS[target]}: {verdict}"
