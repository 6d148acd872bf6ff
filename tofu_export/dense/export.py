"""Static-shape ONNX export of one denoiser step: ``(sample, timestep[, conditioning]) -> output``, batch dynamic.

The ViT exporter (``tofu_export.exporters.onnx``) takes one image input; a denoiser step takes several. This
module traces with the same exporters (dynamo by default, with the project's translation table; or TorchScript),
then reuses its simplification, validity check and save, verifies ONNX Runtime against PyTorch on seeded inputs
at two batch sizes (``DenoiserParity``), checks that the graph has no data-dependent or random op and only
constant-K TopK (``static_graph_problems``), and runs the TensorRT static check against every release (required to
pass on the releases the opset is for, ``trt_targets_for``). Nothing is written at ``path``
unless all of that passed.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from tofu_export.errors import CheckFailed
from tofu_export.exporters.onnx import ExportError, _check, _save
from tofu_export.exporters.simplify import simplify_graph
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
    tensorrt: dict | None = None
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


def _trace(model: nn.Module, example: tuple[Tensor, ...], path: Path, opset: int, names: Sequence[str],
           output_name: str, exporter: str) -> None:
    """Trace ``model(*example)`` to ``path`` with the batch axis of every input and the output dynamic."""
    if exporter == "dynamo":
        from tofu_export.dense.translations import denoiser_translations
        from tofu_export.exporters.dynamo import trace_inputs

        trace_inputs(model, example, path, opset, names, output_name, denoiser_translations(opset))
        return
    axes = {name: {0: "batch"} for name in [*names, output_name]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset, input_names=list(names),
                          output_names=[output_name], dynamic_axes=axes, do_constant_folding=True)


def verify_denoiser(model: nn.Module, onnx_path: str | Path, make_inputs: Callable[[int, int], tuple[Tensor, ...]],
                    batch_sizes: Sequence[int] = (1, 3), tolerance: float = 1e-3) -> DenoiserParity:
    """Compare PyTorch and ONNX Runtime on ``make_inputs(batch, seed)`` for every batch size."""
    from tofu_export.engines.ort import create_session

    session = create_session(onnx_path)
    names = [i.name for i in session.get_inputs()]
    expected_all, got_all = [], []
    for seed, batch in enumerate(batch_sizes):
        inputs = make_inputs(batch, seed)
        with torch.no_grad():
            expected = model(*inputs).float().numpy().reshape(batch, -1)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0].reshape(batch, -1)
        expected_all.append(expected)
        got_all.append(got)
    expected, got = np.concatenate(expected_all), np.concatenate(got_all)
    diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
    cosine = (got * expected).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1),
                                                  1e-30)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    result = DenoiserExport(path, opset, exporter, list(input_names), output_name)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as workdir:
        staged = Path(workdir) / path.name
        try:
            _trace(model, make_inputs(1, 0), staged, opset, input_names, output_name, exporter)
        except Exception as error:
            raise ExportError(f"tracing to ONNX failed: {type(error).__name__}: {error}") from error
        graph = onnx.load(str(staged))
        if simplify:
            graph, note = simplify_graph(graph)
            if note:
                result.notes.append(note)
        problems = static_graph_problems(graph)
        if problems:
            raise CheckFailed(f"the exported graph is not static: {', '.join(problems[:5])}")
        _save(graph, staged)
        result.op_counts = dict(Counter(n.op_type for n in graph.graph.node).most_common())
        _check(staged)
        if verify:
            result.parity = verify_denoiser(model, staged, make_inputs, tolerance=tolerance)
            if not result.parity.ok:
                p = result.parity
                raise CheckFailed(f"ONNX Runtime disagrees with PyTorch: max |diff| = {p.max_abs_diff:.3g} on outputs "
                                  f"up to {p.output_scale:.3g}, lowest cosine {p.min_cosine:.6f}; nothing was written")
        if trt_check:
            from tofu_export.tensorrt.check import check_tensorrt_compat
            from tofu_export.tensorrt.ops import ALL_TARGETS

            report = check_tensorrt_compat(staged, ALL_TARGETS)
            required = trt_targets_for(opset)
            ok = all(report.per_target[t] for t in required)
            result.tensorrt = {"ok": ok, "required": list(required), "per_target": report.per_target,
                               "errors": [f"{i.target}: {i.message}" for i in report.issues
                                          if i.severity == "error"][:10]}
            if not ok:
                raise CheckFailed(f"the graph would not build natively on TensorRT: {report.render()}")
        for staged_file in sorted(Path(workdir).iterdir(), key=lambda p: p.suffix != ".data"):
            os.replace(staged_file, path.parent / staged_file.name)
    return result
