"""One finding of the static TensorRT check, as the check makes it and as a manifest records it (no numpy, no
onnx: the manifest and the commands read it before anything heavy is imported)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class TrtIssue:
    """One reason the graph may not build natively on one target; ``node`` is a node or tensor name."""

    severity: Severity
    target: str
    op_type: str
    node: str
    message: str
