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

import numpy as np
import onnx
import torch
from torch import nn

PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models are saved with external data


class ExportError(RuntimeError):
    """The model could not be exported to a valid ONNX graph that matches PyTorch."""


@dataclass(frozen=True)
class Parity:
    """How closely ONNX Runtime reproduces PyTorch on fixed inputs."""

    batch_sizes: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    output_scale: float  # max |PyTorch output|, for reading max_abs_diff relatively
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
    batch_sizes: Sequence[int] = (1, 4),
    tolerance: float = 1e-4,
    seed: int = 0,
    inputs: torch.Tensor | None = None,
) -> Parity:
    """Run PyTorch and ONNX Runtime on the same fixed inputs and compare outputs.

    Inputs are seeded standard-normal images (the scale of normalised pixels), one batch per size, or ``inputs``
    ``[B, 3, H, W]`` when given. ``ok`` means ``max_abs_diff <= tolerance * max(1, output_scale)``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    batches = (
        [inputs]
        if inputs is not None
        else [torch.randn(b, 3, *img_size, generator=generator) for b in batch_sizes]
    )
    diffs, refs, agree = [], [], []
    for images in batches:
        with torch.no_grad():
            expected = model(images).float().numpy()
        got = session.run(None, {input_name: images.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
        diffs.append(np.abs(got - expected).ravel())
        refs.append(np.abs(expected).ravel())
        if getattr(model, "num_classes", 0) and expected.ndim == 2:
            agree.append(got.argmax(1) == expected.argmax(1))
    diff, scale = np.concatenate(diffs), float(np.concatenate(refs).max())
    max_abs = float(diff.max())
    return Parity(
        batch_sizes=[len(b) for b in batches],
        max_abs_diff=max_abs,
        mean_abs_diff=float(diff.mean()),
        output_scale=scale,
        top1_agreement=float(np.concatenate(agree).mean()) if agree else None,
        tolerance=tolerance,
        ok=max_abs <= tolerance * max(1.0, scale),
    )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    img_size: int | tuple[int, int],
    *,
    opset: int = 17,
    simplify: bool = True,
    verify: bool = True,
    batch_sizes: Sequence[int] = (1, 4),
    tolerance: float = 1e-4,
    input_name: str = "input",
    output_name: str = "output",
) -> OnnxExport:
    """Export ``model`` (eval mode, fp32, CPU) to ``path``: trace, simplify, check, verify parity, then move into place.

    Raises ``ExportError`` (and leaves nothing at ``path``) when the graph is invalid or parity is off.
    """
    if opset < 13:
        raise ExportError(f"opset {opset} is too old: the static reduction needs opset >= 13 (17 recommended; 16 for "
                          "TensorRT 8.5 / JetPack 5, which has no LayerNormalization importer)")
    size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().cpu()
    result = OnnxExport(path, opset, input_name, output_name, size, simplified=False)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as workdir:
        staged = Path(workdir) / path.name
        try:
            _trace(model, torch.zeros(1, 3, *size), staged, opset, input_name, output_name)
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
            if not result.parity.ok:
                raise ExportError(
                    f"ONNX Runtime disagrees with PyTorch: max |diff| = {result.parity.max_abs_diff:.3g} on outputs "
                    f"up to {result.parity.output_scale:.3g} (tolerance {tolerance:g} relative); nothing was written. "
                    "If the model is numerically sensitive, raise --tolerance; otherwise please report it."
                )
        for staged_file in sorted(Path(workdir).iterdir(), key=lambda p: p.suffix != ".data"):  # data first
            os.replace(staged_file, path.parent / staged_file.name)
    return result
