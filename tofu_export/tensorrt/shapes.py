"""The static check's tensor-level rules: symbolic shape inference, static shapes (only the batch axis dynamic) and
dtypes TensorRT cannot represent (DOUBLE; INT64 constants that 8.x clamps to INT32)."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from tofu_export.tensorrt.issues import TrtIssue
from tofu_export.tensorrt.ops import CASTS_INT64_TO_INT32
from tofu_export.tensorrt.rules import GraphIndex, for_targets

# Slice starts/ends hold INT64_MAX for "to the end"; clamping them to INT32 keeps their meaning.
_CLAMP_SAFE_INPUTS = frozenset({("Slice", 1), ("Slice", 2)})
_INT32 = np.iinfo(np.int32)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def infer_shapes(model: onnx.ModelProto, targets: tuple[str, ...]) -> tuple[onnx.ModelProto, list[TrtIssue]]:
    """Symbolic shape inference (follows Shape/Gather/Concat arithmetic, keeps ``batch`` symbolic)."""
    try:
        inference = _symbolic_shape_inference()
        with _inside_temporary_directory():  # on failure it dumps sym_shape_infer_temp.onnx into the cwd
            inferred = inference.infer_shapes(model, auto_merge=False, guess_output_rank=False)
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
    return fallback, for_targets(targets, "warning", "", model.graph.name, message)


def _symbolic_shape_inference() -> type:
    """ONNX Runtime's ``SymbolicShapeInference``, loaded without running the ``onnxruntime.tools`` package's
    ``__init__``, which imports torch whenever it is installed (2 CPU-s of ``tofu-export check``'s 3 on this VM) for a
    helper this check never uses. The module imports nothing relative to its package; where its file is not where
    it was, the plain import."""
    name = "onnxruntime.tools.symbolic_shape_infer"
    if name not in sys.modules:
        import onnxruntime

        path = Path(onnxruntime.__file__).parent / "tools" / "symbolic_shape_infer.py"
        spec = importlib.util.spec_from_file_location(name, path) if path.is_file() else None
        if spec is None or spec.loader is None:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            return SymbolicShapeInference
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name].SymbolicShapeInference


@contextmanager
def _inside_temporary_directory() -> Iterator[None]:
    previous = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="tofu-shape-infer-") as directory:
        os.chdir(directory)
        try:
            yield
        finally:
            os.chdir(previous)


def shape_issues(graph: onnx.GraphProto, targets: tuple[str, ...]) -> list[TrtIssue]:
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
            issues += for_targets(targets, "error", "", info.name, problem)
    for info in graph.value_info:
        problem = _intermediate_dims_problem(info, batch_symbols)
        if problem:
            issues += for_targets(targets, "error", "", info.name, problem)
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


def dtype_issues(graph: GraphIndex, targets: tuple[str, ...]) -> list[TrtIssue]:
    issues: list[TrtIssue] = []
    initializers = {init.name for init in graph.graph.initializer}
    typed = [*graph.graph.input, *graph.graph.output, *graph.graph.value_info]
    doubles = {info.name for info in typed if info.type.tensor_type.elem_type == TensorProto.DOUBLE}
    doubles |= {name for name, value in graph.constants.items() if value.dtype == np.float64}
    for name in sorted(doubles):
        issues += for_targets(targets, "error", "", name, "DOUBLE tensor: cast to float32 before export")
    for info in graph.graph.input:
        if info.name not in initializers and info.type.tensor_type.elem_type == TensorProto.INT64:
            message = "INT64 graph input: 8.5 binds it as INT32, 10.x needs an INT64 buffer"
            issues += for_targets(targets, "warning", "", info.name, message)
    casting = [target for target in targets if CASTS_INT64_TO_INT32[target]]
    for name, value in graph.constants.items():
        if value.dtype != np.int64 or value.size == 0 or _clamp_is_exact(name, graph):
            continue
        if value.min() < _INT32.min or value.max() > _INT32.max:
            message = f"INT64 constant outside INT32 range ({value.min()}..{value.max()}) would be clamped"
            issues += for_targets(casting, "error", "", name, message)
    return issues


def _clamp_is_exact(name: str, graph: GraphIndex) -> bool:
    consumers = graph.consumers.get(name, [])
    return bool(consumers) and all((node.op_type, index) in _CLAMP_SAFE_INPUTS for node, index in consumers)
