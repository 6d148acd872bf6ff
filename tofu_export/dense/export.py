"""Static-shape ONNX export of one denoiser step: ``(sample, timestep[, conditioning]) -> output``, batch dynamic.

The ViT exporter (``tofu_export.exporters.onnx``) takes one image input; a denoiser step takes several. This module
traces with the same function (``exporters.trace``: dynamo by default, with the denoiser's translation table; or
TorchScript), stages, simplifies, saves and checks the graph as the ViT export does, verifies ONNX Runtime against
PyTorch on seeded inputs at two batch sizes (``DenoiserParity``, on ``exporters.parity``'s runner), checks that the
graph has no data-dependent or random op and only constant-K TopK (``static_graph_problems``), and runs the TensorRT
static check against every release (required to pass on the releases the opset is for, ``trt_targets_for``). Nothing
is written at ``path`` unless all of that passed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from torch import Tensor, nn

from tofu_export.dense.translations import denoiser_translations
from tofu_export.errors import CheckFailed, ExportError
from tofu_export.exporters.parity import row_cosines, side_by_side
from tofu_export.exporters.simplify import simplify_graph
from tofu_export.exporters.staging import check_graph, save_graph, staged
from tofu_export.exporters.trace import trace_graph
from tofu_export.manifest import TrtCheckRecord
from tofu_export.names import DEFAULT_EXPORTER, EXPORTERS

FORBIDDEN_OPS = frozenset({"If", "Loop", "Scan", "NonZero", "ScatterElements", "ScatterND", "Unique", "RandomNormal",
                           "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"})
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class DenoiserParity:
    """ONNX Runtime vs PyTorch over seeded inputs: ``ok`` when every sample's cosine is at least ``MIN_COSINE``
    and the largest difference is within ``tolerance`` of the output scale."""

    batch_sizes: list[int]
    max_abs_diff: float
    output_scale: float
    min_cosine: float
    tolerance: float
    ok: bool


@dataclass
class DenoiserExport:
    path: Path
    opset: int
    exporter: str
    input_names: list[str]
    output_name: str
    op_counts: dict[str, int] = field(default_factory=dict)
    parity: DenoiserParity | None = None
    tensorrt: TrtCheckRecord | None = None  # the static check, against every release; ok on the required ones
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def static_graph_problems(graph: onnx.ModelProto) -> list[str]:
    """What keeps ``graph`` from being static: forbidden ops, and TopK whose K is not a constant."""
    constants = {i.name for i in graph.graph.initializer}
    constants |= {n.output[0] for n in graph.graph.node if n.op_type == "Constant"}
    problems = [f"{n.op_type} ({n.name})" for n in graph.graph.node if n.op_type in FORBIDDEN_OPS]
    problems += [f"TopK with a computed K ({n.name})" for n in graph.graph.node
                 if n.op_type == "TopK" and n.input[1] not in constants]
    return problems


def trt_targets_for(opset: int) -> tuple[str, ...]:
    """The TensorRT releases a graph at ``opset`` is made for: every release whose parser takes that opset's
    LayerNorm (opset 17: 10 only; 16: 8.5 and 10). The others are checked and reported, not required."""
    from tofu_export.tensorrt.ops import ALL_TARGETS
    from tofu_export.tensorrt.targets import export_opset

    return tuple(t for t in ALL_TARGETS if opset <= export_opset([t]))


def verify_denoiser(model: nn.Module, onnx_path: str | Path, make_inputs: Callable[[int, int], tuple[Tensor, ...]],
                    batch_sizes: Sequence[int] = (1, 3), tolerance: float = 1e-3) -> DenoiserParity:
    """Compare PyTorch and ONNX Runtime on ``make_inputs(batch, seed)`` for every batch size."""
    batches = [make_inputs(batch, seed) for seed, batch in enumerate(batch_sizes)]
    expected, got = side_by_side(model, onnx_path, batches)  # [samples, outputs]
    diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    cosine = row_cosines(got, expected)
    ok = bool(cosine.min() >= MIN_COSINE and diff <= tolerance * max(1.0, scale))
    return DenoiserParity(list(batch_sizes), diff, scale, float(cosine.min()), tolerance, ok)


def export_denoiser(model: nn.Module, path: str | Path, make_inputs: Callable[[int, int], tuple[Tensor, ...]],
                    input_names: Sequence[str], *, output_name: str = "output", opset: int = 17,
                    exporter: str = DEFAULT_EXPORTER, simplify: bool = True, verify: bool = True,
                    tolerance: float = 1e-3, trt_check: bool = True) -> DenoiserExport:
    """Export one step of ``model`` (``make_inputs(batch, seed)`` gives its inputs) to ``path``: trace, simplify,
    check static, verify parity, check TensorRT support, then move into place. Raises ``ExportError`` /
    ``CheckFailed`` and writes nothing when a step fails."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    model = model.eval().float().cpu()
    result = DenoiserExport(path, opset, exporter, list(input_names), output_name)
    with staged(path) as graph_path:
        translations = denoiser_translations(opset) if exporter == "dynamo" else None
        trace_graph(model, make_inputs(1, 0), graph_path, opset, input_names, output_name, exporter, translations)
        graph = onnx.load(str(graph_path))
        if simplify:
            graph, note = simplify_graph(graph)
            if note:
                result.notes.append(note)
        problems = static_graph_problems(graph)
        if problems:
            raise CheckFailed(f"the exported graph is not static: {', '.join(problems[:5])}")
        save_graph(graph, graph_path)
        result.op_counts = dict(Counter(n.op_type for n in graph.graph.node).most_common())
        check_graph(graph_path)
        if verify:
            result.parity = verify_denoiser(model, graph_path, make_inputs, tolerance=tolerance)
            if not result.parity.ok:
                p = result.parity
                raise CheckFailed(f"ONNX Runtime disagrees with PyTorch: max |diff| = {p.max_abs_diff:.3g} on outputs "
                                  f"up to {p.output_scale:.3g}, lowest cosine {p.min_cosine:.6f}; nothing was written")
        if trt_check:
            from tofu_export.tensorrt.check import check_tensorrt_compat
            from tofu_export.tensorrt.ops import ALL_TARGETS

            report = check_tensorrt_compat(graph_path, ALL_TARGETS)
            result.tensorrt = report.record(build_for=trt_targets_for(opset))  # every release checked; these must pass
            if not result.tensorrt.ok:
                raise CheckFailed(f"the graph would not build natively on TensorRT: {report.render()}")
    return result
