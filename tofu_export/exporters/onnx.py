"""Trace a (ToFu-patched, static) model to ONNX, simplify, convert to the precision asked for, check, and verify it
against the FP32 PyTorch model before writing.

``export_onnx`` writes nothing at ``path`` unless every step passed: the graph is built in a temporary folder beside
the destination and moved into place at the end. Precisions and their parity floors: ``exporters.precision``;
simplifiers: ``exporters.simplify``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from tofu_export.errors import UserError
from tofu_export.exporters.precision import PARITY_FLOORS, check_precision, quantize_file, to_fp16
from tofu_export.exporters.simplify import PROTOBUF_LIMIT, simplify_graph
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

MIN_COSINE = PARITY_FLOORS["fp32"].min_cosine  # every image's ONNX output must keep at least this cosine to PyTorch's
MIN_WITHIN = PARITY_FLOORS["fp32"].min_within  # and at least this fraction of images must agree to the tolerance


class ExportError(UserError, RuntimeError):
    """The model could not be exported to a valid ONNX graph that matches PyTorch."""


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces PyTorch on fixed inputs.

    Token matching takes discrete decisions (top-k of similarity scores). Where two candidate matches are tied to
    within float rounding, ONNX Runtime and PyTorch (whose kernels round differently) may resolve the tie
    differently, and that image's output then differs more than rounding. ``ok`` therefore asks that *most*
    images agree to ``tolerance`` (relative to the output scale) and that *every* image keeps a cosine
    similarity of at least ``MIN_COSINE`` to PyTorch's output; the images over tolerance are counted. FP16 and INT8
    graphs are held to their own floors (``precision.PARITY_FLOORS``), always against the FP32 PyTorch model.
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
    precision: str = "fp32"


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


def _trace(model: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str, output_name: str) -> None:
    """TorchScript-trace ``model`` to ``path`` with a dynamic batch axis; every other dim is static."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected: shapes *are* constant
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=[output_name], do_constant_folding=True,
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})


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
    precision: Precision = "fp32",
) -> Parity:
    """Run PyTorch (FP32) and ONNX Runtime on the same fixed inputs and compare outputs (see ``Parity`` for ``ok``).

    Inputs are seeded standard-normal images (the scale of normalised pixels), one batch per size, or ``inputs``
    ``[B, 3, H, W]`` when given; an FP16 graph is fed FLOAT16. ``precision`` picks the floors the outputs must meet.
    """
    from tofu_export.engines.ort import create_session

    session = create_session(onnx_path)
    input_name = session.get_inputs()[0].name
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
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
        got = session.run(None, {input_name: images.numpy().astype(dtype)})[0].astype(np.float32)
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
        expected_all.append(expected.reshape(len(images), -1))
        got_all.append(got.reshape(len(images), -1))
    expected, got = np.concatenate(expected_all), np.concatenate(got_all)  # [images, outputs]
    floor = PARITY_FLOORS[precision]
    diff, scale = np.abs(got - expected), float(np.abs(expected).max())
    within = diff.max(axis=1) <= (floor.relative or tolerance) * max(1.0, scale)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = (got * expected).sum(axis=1) / np.maximum(norms, 1e-30)
    classifier = bool(getattr(model, "num_classes", 0)) and expected.shape[1] > 1
    top1 = float((got.argmax(1) == expected.argmax(1)).mean()) if classifier else None
    return Parity(
        batch_sizes=[len(b) for b in batches],
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        output_scale=scale,
        images_within_tolerance=float(within.mean()),
        min_cosine=float(cosine.min()),
        top1_agreement=top1,
        tolerance=floor.relative or tolerance,
        ok=bool(within.mean() >= floor.min_within and cosine.min() >= floor.min_cosine
                and (top1 is None or floor.min_top1 is None or top1 >= floor.min_top1)),
        precision=precision,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    simplifier = simplifier if simplify else "none"
    result = OnnxExport(path, opset, input_name, output_name, size, simplified=False, exporter=exporter,
                        precision=precision, simplifier=simplifier)  # fmt: skip
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
        graph, note = simplify_graph(onnx.load(str(staged)), simplifier)
        result.simplified = simplifier != "none" and note is None
        result.notes += [note] if note else []
        result.external_data = _save(to_fp16(graph) if precision == "fp16" else graph, staged)
        if precision == "int8":
            calibration, note = quantize_file(staged, size, calibration, int8_symmetric)
            result.notes += [note] if note else []
        result.op_counts = dict(Counter(node.op_type for node in onnx.load(str(staged), load_external_data=False)
                                        .graph.node).most_common())  # fmt: skip
        _check(staged)
        if verify:
            result.parity = _verified(model, staged, size, batch_sizes, tolerance, precision, calibration)
            result.notes += _parity_notes(result.parity)
        for staged_file in sorted(Path(workdir).iterdir(), key=lambda p: p.suffix != ".data"):  # data first
            os.replace(staged_file, path.parent / staged_file.name)
    return result


def _verified(
    model: nn.Module, staged: Path, size: tuple[int, int], batch_sizes: Sequence[int], tolerance: float,
    precision: Precision, images: torch.Tensor | None,
) -> Parity:  # fmt: skip
    """The parity of ``staged`` (on ``images`` when given, else seeded random batches); ``ExportError`` when off."""
    parity = verify_parity(model, staged, size, batch_sizes, tolerance, inputs=images, precision=precision)
    if not parity.ok:
        floor = PARITY_FLOORS[precision]
        top1 = "" if parity.top1_agreement is None or floor.min_top1 is None else (
            f"; top-1 agreement {parity.top1_agreement:.0%} ({floor.min_top1:.0%} needed)")
        raise ExportError(
            f"the {precision} graph on ONNX Runtime disagrees with the FP32 PyTorch model: max |diff| = "
            f"{parity.max_abs_diff:.3g} on outputs up to {parity.output_scale:.3g}; "
            f"{parity.images_within_tolerance:.0%} of the images agree to the tolerance ({parity.tolerance:g} "
            f"relative, {floor.min_within:.0%} needed) and the lowest per-image cosine is {parity.min_cosine:.6f} "
            f"({floor.min_cosine} needed){top1}; nothing was written. {parity_advice(parity)}"
        )
    return parity


def parity_advice(parity: Parity) -> str:
    """What to do about a failed check: enough images agree but one is below the cosine floor (FP32): near ties."""
    floor = PARITY_FLOORS[parity.precision]
    if parity.precision == "fp32" and parity.images_within_tolerance >= floor.min_within:
        return ("Most images agree, so the graph computes the model; the others hold near-tied token matches that "
                "ONNX Runtime and PyTorch resolve differently, and with few tokens left one such tie moves the output "
                "further than the cosine floor allows: reduce less in the last blocks (a smaller r, or a policy "
                "calibrated for less speed-up).")
    return ("If the model is numerically sensitive, raise --tolerance (FP32) or use a higher precision; otherwise "
            "please report it.")


def _parity_notes(parity: Parity) -> list[str]:
    if parity.images_within_tolerance >= 1:
        return []
    return [
        f"{1 - parity.images_within_tolerance:.0%} of the parity images differ by more than the tolerance "
        f"(up to {parity.max_abs_diff:.3g}, cosine >= {parity.min_cosine:.7f}): near-tied token matches resolved "
        "differently by ONNX Runtime and PyTorch, whose float rounding differs"
        + ("" if parity.precision == "fp32" else f", and the {parity.precision} graph rounds more")
        + "."
    ]
