"""Trace a (ToFu-patched, static) model to ONNX, simplify, convert to the precision asked for, check, and verify it
against the FP32 PyTorch model before writing.

``export_onnx`` writes nothing at ``path`` unless every step passed (``exporters.staging``). Tracing:
``exporters.trace``; simplifiers: ``exporters.simplify``; precisions and their parity floors: ``exporters.precision``;
the parity check: ``exporters.parity``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from tofu_export.errors import ExportError
from tofu_export.exporters.parity import Parity, parity_notes, require_parity
from tofu_export.exporters.precision import check_precision, quantize_file, to_fp16
from tofu_export.exporters.simplify import simplify_graph
from tofu_export.exporters.staging import check_graph, save_graph, staged
from tofu_export.exporters.trace import trace_graph
from tofu_export.names import (
    DEFAULT_EXPORTER,
    DEFAULT_SIMPLIFIER,
    EXPORTERS,
    SIMPLIFIERS,
    Exporter,
    Precision,
    Simplifier,
)
from tofu_export.sizes import as_pair


@dataclass
class OnnxExport:
    path: Path
    opset: int
    input_name: str
    output_name: str
    img_size: tuple[int, int]
    simplified: bool
    exporter: str = DEFAULT_EXPORTER
    precision: str = "fp32"
    simplifier: str = DEFAULT_SIMPLIFIER
    notes: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    parity: Parity | None = None
    external_data: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def export_onnx(
    model: nn.Module,
    path: str | Path,
    img_size: int | tuple[int, int],
    *,
    opset: int = 17,
    simplify: bool = True,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 8),
    tolerance: float = 1e-4,
    input_name: str = "input",
    output_name: str = "output",
    exporter: Exporter = DEFAULT_EXPORTER,
    precision: Precision = "fp32",
    simplifier: Simplifier = DEFAULT_SIMPLIFIER,
    calibration: torch.Tensor | None = None,
    example: torch.Tensor | None = None,
    int8_symmetric: bool = True,
) -> OnnxExport:
    """Export ``model`` (eval mode, fp32, CPU) to ``path``: trace, simplify, convert, check, verify parity, then move
    into place.

    ``exporter`` is ``"torchscript"`` (the TorchScript tracer) or ``"dynamo"`` (torch.export, see
    ``tofu_export.exporters.dynamo``; needs onnxscript). Both give a graph with a dynamic batch axis only.
    ``simplifier``: ``onnxslim`` | ``onnxsim`` | ``none`` (``simplify=False`` is ``none``). ``precision``: ``fp16``
    converts the graph (FLOAT16 inputs/outputs), ``int8`` quantizes it (Q/DQ) on ``calibration`` images
    ``[N, 3, H, W]`` (model-normalised; without them, synthetic images and a note), and parity then uses those
    images too; ``int8_symmetric=False`` quantizes activations to asymmetric UINT8 (ONNX Runtime CPU, not TensorRT).
    Raises ``ExportError`` (and leaves nothing at ``path``) when the graph is invalid or parity is off.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if simplifier not in SIMPLIFIERS:
        raise ExportError(f"unknown simplifier {simplifier!r}; choose one of {', '.join(SIMPLIFIERS)}")
    precision = check_precision(precision)
    if opset < 13:
        raise ExportError(f"opset {opset} is too old: the static reduction needs opset >= 13 (17 recommended; 16 for "
                          "TensorRT 8.5 / JetPack 5, which has no LayerNormalization importer)")
    size = as_pair(img_size)
    path = Path(path)
    model = model.eval().float().cpu()
    simplifier = simplifier if simplify else "none"
    result = OnnxExport(path, opset, input_name, output_name, size, simplified=False, exporter=exporter,
                        precision=precision, simplifier=simplifier)  # fmt: skip
    with staged(path) as graph_path:
        example = torch.zeros(1, 3, *size) if example is None else example  # another input: verify=False
        trace_graph(model, (example,), graph_path, opset, [input_name], output_name, exporter)
        graph, note = simplify_graph(onnx.load(str(graph_path)), simplifier)
        result.simplified = simplifier != "none" and note is None
        result.notes += [note] if note else []
        result.external_data = save_graph(to_fp16(graph) if precision == "fp16" else graph, graph_path)
        if precision == "int8":
            calibration, note = quantize_file(graph_path, size, calibration, int8_symmetric)
            result.notes += [note] if note else []
        result.op_counts = dict(Counter(node.op_type for node in onnx.load(str(graph_path), load_external_data=False)
                                        .graph.node).most_common())  # fmt: skip
        check_graph(graph_path)
        if verify:
            # a symmetric INT8 graph is TensorRT's: check its Q/DQ arithmetic, not ONNX Runtime's fused integer kernels
            # (which differ by CPU: with AVX2 but no VNNI they lost 0.02 of cosine on the test suite's tiny ViT)
            unfused = precision == "int8" and int8_symmetric
            result.parity = require_parity(model, graph_path, size, batch_sizes, tolerance, precision, calibration,
                                           "basic" if unfused else "all")
            result.notes += parity_notes(result.parity)
    return result
