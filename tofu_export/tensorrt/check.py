"""GPU-free check that an ONNX graph builds as a TensorRT engine natively (no plugins) on Jetson.

Answers, from the ONNX file alone, "will the TensorRT ONNX parser of JetPack 5 (TensorRT 8.5) and
JetPack 6 (TensorRT 10.x) take this graph, with only the batch axis dynamic?": operator support per TensorRT
version, the per-operator restrictions that matter for exported ViTs, static shapes, and dtypes TensorRT
cannot represent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from tofu_export.tensorrt.issues import TrtIssue
from tofu_export.tensorrt.ops import (
    DATA_DEPENDENT_OPS,
    MAX_OPSET,
    MIN_OPSET,
    NATIVE_OPS,
    TARGET_LABELS,
    UNSUPPORTED_OP_HINTS,
)
from tofu_export.tensorrt.rules import RESTRICTIONS, GraphIndex, for_targets
from tofu_export.tensorrt.shapes import dtype_issues, infer_shapes, shape_issues
from tofu_export.tensorrt.targets import validate_targets

if TYPE_CHECKING:
    from tofu_export.manifest import TrtCheckRecord

_RENDER_MAX_ISSUES = 25


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

    def record(self, build_for: Sequence[str]) -> TrtCheckRecord:
        """The manifest's record of this check for an artifact made for ``build_for``: its ``ok`` says whether every
        one of those releases builds natively (every checked release when ``build_for`` is empty), the same for
        every producer; ``per_target`` keeps the verdict of each release checked."""
        from tofu_export.manifest import TrtCheckRecord

        record = TrtCheckRecord.from_dict({**self.to_dict(), "build_for": list(build_for)})
        record.ok = all(record.per_target.get(target, False) for target in record.requested)
        return record

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
    targets = validate_targets(targets)
    proto = onnx.load(str(model)) if isinstance(model, str | Path) else model
    opset = _default_opset(proto)
    inferred, inference_issues = infer_shapes(proto, targets)
    graph = GraphIndex.build(inferred.graph)
    issues = [
        *inference_issues,
        *_opset_issues(opset, targets),
        *_op_issues(graph, targets),
        *shape_issues(inferred.graph, targets),
        *dtype_issues(graph, targets),
    ]
    op_counts = dict(sorted(Counter(node.op_type for node in inferred.graph.node).items()))
    return TrtCompatReport(targets=targets, opset=opset, op_counts=op_counts, issues=issues)


def _default_opset(model: onnx.ModelProto) -> int:
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    return max(versions, default=0)


def _opset_issues(opset: int, targets: tuple[str, ...]) -> list[TrtIssue]:
    issues = []
    if opset < MIN_OPSET:
        message = f"opset {opset} < {MIN_OPSET}; re-export with opset 16 (or 17 for TensorRT 10 only)"
        issues += for_targets(targets, "error", "", "opset", message)
    for target in targets:
        if opset > MAX_OPSET[target]:
            message = f"opset {opset} > {MAX_OPSET[target]}, the newest {TARGET_LABELS[target]} parses"
            issues += for_targets([target], "error", "", "opset", message)
    return issues


def _op_issues(graph: GraphIndex, targets: tuple[str, ...]) -> list[TrtIssue]:
    issues: list[TrtIssue] = []
    for position, node in enumerate(graph.graph.node):
        name = node.name or f"{node.op_type}#{position}"
        if node.domain not in ("", "ai.onnx"):
            message = f"custom-domain op '{node.domain}::{node.op_type}' needs a TensorRT plugin"
            issues += for_targets(targets, "error", node.op_type, name, message)
            continue
        if node.op_type in DATA_DEPENDENT_OPS:
            message = "data-dependent control flow/shapes cannot form a static-shape engine"
            issues += for_targets(targets, "error", node.op_type, name, message)
            continue
        missing = [target for target in targets if node.op_type not in NATIVE_OPS[target]]
        hint = UNSUPPORTED_OP_HINTS.get(node.op_type)
        message = "op has no native TensorRT importer" + (f" ({hint})" if hint else "")
        issues += for_targets(missing, "error", node.op_type, name, message)
        for restriction in RESTRICTIONS.get(node.op_type, ()):
            for restricted_targets, message in restriction(node, graph):
                applicable = [target for target in targets if target in restricted_targets]
                issues += for_targets(applicable, "error", node.op_type, name, message)
    return issues


def _verdict_line(target: str, issues: list[TrtIssue]) -> str:
    errors = sum(issue.target == target and issue.severity == "error" for issue in issues)
    warnings = sum(issue.target == target and issue.severity == "warning" for issue in issues)
    verdict = f"FAIL ({errors} error{'s' * (errors != 1)})" if errors else "OK"
    if warnings:
        verdict += f" ({warnings} warning{'s' * (warnings != 1)})"
    return f"{TARGET_LABELS[target]}: {verdict}"
