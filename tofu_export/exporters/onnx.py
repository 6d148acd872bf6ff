"""Trace a (ToFu-patched, static) model to ONNX, simplify, check, and verify it against PyTorch before writing.

``export_onnx`` writes nothing at ``path`` unless every step passed: the graph is built in a temporary folder beside
the destination and moved into place at the end.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from tofu_export.errors import UserError
from tofu_export.sizes import as_pair

PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models are saved with external data
MIN_COSINE = 0.999  # every image's ONNX output must keep at least this cosine to PyTorch's
MIN_WITHIN = 2 / 3  # and at least this fraction of images must agree to the tolerance
Exporter = Literal["torchscript", "dynamo"]
EXPORTERS: tuple[str, ...] = ("torchscript", "dynamo")
DEFAULT_EXPORTER: Exporter = "dynamo"  # measured: bench/results/latency_deit_small*.md (TorchScript is deprecated)


class ExportError(UserError, RuntimeError):
    """The model could not be exported to a valid ONNX graph that matches PyTorch."""


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces PyTorch on fixed inputs.

    Token matching takes discrete decisions (top-k of similarity scores). Where two candidate matches are tied to
    within float rounding, ONNX Runtime and PyTorch (whose kernels round differently) may resolve the tie
    differently, and that image's output then differs more than rounding. ``ok`` therefore asks that *most*
    images agree to ``tolerance`` (relative to the output scale) and that *every* image keeps a cosine
    similarity of at least ``MIN_COSINE`` to PyTorch's output; the images over tolerance are counted.
    """

    batch_sizes: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    output_scale: float  # max |PyTorch output|, for reading max_abs_diff relatively
    images_within_tolerance: float  # fraction of images whose every output is within tolerance
    min_cosine: float  # smallest per-image cosine similarity between the two outputs
    top1_agreement: float | None  # fraction of images with the same argmax (classifiers only, else None)
    tolerance: float
    ok: bool


@dataclass
class OnnxExport:
    path: Path
    opset: int
    input_name: str
    output_name: str
    img_size: tuple[int, int]
    simplified: bool
    exporter: str = DEFAULT_EXPORTER
    notes: list[str] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    parity: Parity | None = None
    external_data: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


def _trace(model: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str, output_name: str) -> None:
    """TorchScript-trace ``model`` to ``path`` with a dynamic batch axis; every other dim is static."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected: shapes *are* constant
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )


def _trace_dynamo(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str, output_name: str
) -> None:
    """torch.export to ``path`` (``tofu_export.exporters.dynamo``); says what to install when onnxscript is missing."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError("the dynamo exporter needs onnxscript: pip install onnxscript") from error
    from tofu_export.exporters.dynamo import trace_dynamo

    trace_dynamo(model, example, path, opset, input_name, output_name)


def _simplify(graph: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Run onnxsim; on any failure keep the unsimplified graph and say why."""
    if graph.ByteSize() > PROTOBUF_LIMIT:
        return graph, "simplification skipped: the model is larger than 2 GB (onnxsim needs it in one protobuf)"
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(graph)
    except Exception as error:  # onnxsim raises many kinds; any of them means "keep the original"
        return graph, f"simplification failed and was skipped ({type(error).__name__}: {error})"
    if not ok:
        return graph, "onnxsim could not validate the simplified graph; the unsimplified graph was kept"
    # onnxsim can fuse ops (e.g. ReduceMax + Unsqueeze -> ReduceMax keepdims=1) and keep stale shape annotations:
    # drop them and infer shapes afresh.
    del simplified.graph.value_info[:]
    _restore_scope_names(graph, simplified)
    return onnx.shape_inference.infer_shapes(simplified, strict_mode=True), None


def _restore_scope_names(original: onnx.ModelProto, simplified: onnx.ModelProto) -> None:
    """Give fused nodes (onnxsim names its MatMul+Add -> Gemm fusions ``Gemm_3``) the module scope of the node
    whose weight they took over, e.g. ``/blocks/blocks.0/mlp/fc2/Gemm``, so profiles can attribute their time."""
    weights = {init.name for init in original.graph.initializer}
    scope_of = {
        name: node.name.rsplit("/", 1)[0]
        for node in original.graph.node
        if node.name.startswith("/")
        for name in node.input
        if name in weights
    }
    taken = {node.name for node in simplified.graph.node}
    for node in simplified.graph.node:
        scope = next((scope_of[name] for name in node.input if name in scope_of), None)
        if node.name.startswith("/") or scope is None:
            continue
        name, k = f"{scope}/{node.op_type}", 1
        while name in taken:
            name, k = f"{scope}/{node.op_type}_{k}", k + 1
        taken.add(name)
        node.name = name


def _save(graph: onnx.ModelProto, path: Path) -> bool:
    """Save ``graph``; models over the protobuf limit go to ``<name>.data`` beside it. Returns whether they did."""
    external = graph.ByteSize() > PROTOBUF_LIMIT
    onnx.save(graph, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)
    return external


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the exported graph is not valid ONNX: {error}") from error


def verify_parity(
    model: nn.Module,
    onnx_path: str | Path,
    img_size: tuple[int, int],
    batch_sizes: Sequence[int] = (1, 8),
    tolerance: float = 1e-4,
    seed: int = 0,
    inputs: torch.Tensor | None = None,
) -> Parity:
    """Run PyTorch and ONNX Runtime on the same fixed inputs and compare outputs (see ``Parity`` for ``ok``).

    Inputs are seeded standard-normal images (the scale of normalised pixels), one batch per size, or ``inputs``
    ``[B, 3, H, W]`` when given.
    """
    from tofu_export.engines.ort import create_session

    session = create_session(onnx_path)
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    batches = (
        [inputs]
        if inputs is not None
        else [torch.randn(b, 3, *img_size, generator=generator) for b in batch_sizes]
    )
    expected_all, got_all = [], []
    for images in batches:
        with torch.no_grad():
            expected = model(images).float().numpy()
        got = session.run(None, {input_name: images.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
        expected_all.append(expected.reshape(len(images), -1))
        got_all.append(got.reshape(len(images), -1))
    expected, got = np.concatenate(expected_all), np.concatenate(got_all)  # [images, outputs]
    diff, scale = np.abs(got - expected), float(np.abs(expected).max())
    within = diff.max(axis=1) <= tolerance * max(1.0, scale)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = (got * expected).sum(axis=1) / np.maximum(norms, 1e-30)
    classifier = bool(getattr(model, "num_classes", 0)) and expected.shape[1] > 1
    return Parity(
        batch_sizes=[len(b) for b in batches],
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        output_scale=scale,
        images_within_tolerance=float(within.mean()),
        min_cosine=float(cosine.min()),
        top1_agreement=float((got.argmax(1) == expected.argmax(1)).mean()) if classifier else None,
        tolerance=tolerance,
        ok=bool(within.mean() >= MIN_WITHIN and cosine.min() >= MIN_COSINE),
    )


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
    example: torch.Tensor | None = None,
) -> OnnxExport:
    """Export ``model`` (eval mode, fp32, CPU) to ``path``: trace, simplify, check, verify parity, then move into place.

    ``exporter`` is ``"torchscript"`` (the TorchScript tracer) or ``"dynamo"`` (torch.export, see
    ``tofu_export.exporters.dynamo``; needs onnxscript). Both give a graph with a dynamic batch axis only.
    Raises ``ExportError`` (and leaves nothing at ``path``) when the graph is invalid or parity is off.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if opset < 13:
        raise ExportError(f"opset {opset} is too old: the static reduction needs opset >= 13 (17 recommended; 16 for "
                          "TensorRT 8.5 / JetPack 5, which has no LayerNormalization importer)")
    size = as_pair(img_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    result = OnnxExport(path, opset, input_name, output_name, size, simplified=False, exporter=exporter)
    trace = _trace if exporter == "torchscript" else _trace_dynamo
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as workdir:
        staged = Path(workdir) / path.name
        try:
            example = torch.zeros(1, 3, *size) if example is None else example  # another input: verify=False
            trace(model, example, staged, opset, input_name, output_name)
        except ExportError:
            raise
        except Exception as error:
            raise ExportError(f"tracing to ONNX failed: {type(error).__name__}: {error}") from error
        graph = onnx.load(str(staged))
        if simplify:
            graph, note = _simplify(graph)
            result.simplified = note is None
            if note:
                result.notes.append(note)
        result.external_data = _save(graph, staged)
        result.op_counts = dict(Counter(node.op_type for node in graph.graph.node).most_common())
        _check(staged)
        if verify:
            result.parity = verify_parity(model, staged, size, batch_sizes, tolerance)
            parity = result.parity
            if not parity.ok:
                raise ExportError(
                    f"ONNX Runtime disagrees with PyTorch: max |diff| = {parity.max_abs_diff:.3g} on outputs up to "
                    f"{parity.output_scale:.3g}; {parity.images_within_tolerance:.0%} of the images agree to the "
                    f"tolerance ({tolerance:g} relative, {MIN_WITHIN:.0%} needed) and the lowest per-image cosine "
                    f"is {parity.min_cosine:.6f} ({MIN_COSINE} needed); nothing was written. If the model is "
                    "numerically sensitive, raise --tolerance; otherwise please report it."
                )
            if parity.images_within_tolerance < 1:
                result.notes.append(
                    f"{1 - parity.images_within_tolerance:.0%} of the parity images differ by more than the tolerance "
                    f"(up to {parity.max_abs_diff:.3g}, cosine >= {parity.min_cosine:.7f}): near-tied token matches "
                    "resolved differently by ONNX Runtime and PyTorch, whose float rounding differs."
                )
        for staged_file in sorted(Path(workdir).iterdir(), key=lambda p: p.suffix != ".data"):  # data first
            os.replace(staged_file, path.parent / staged_file.name)
    return result
