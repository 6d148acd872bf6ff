"""Trace a model to an ONNX file with a dynamic batch axis: the TorchScript tracer or torch.export
(``exporters.dynamo``), for every model family alike: a ViT's one image input, a denoiser's sample, timestep and
condition."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from tofu_export.errors import ExportError, Hint, exception_chain
from tofu_export.exporters.staging import move_files, save_graph
from tofu_export.names import Exporter


def trace_graph(
    model: nn.Module,
    examples: tuple[torch.Tensor, ...],
    path: Path,
    opset: int,
    input_names: Sequence[str],
    output_name: str,
    exporter: Exporter,
    translations: dict | None = None,
) -> None:
    """Export ``model(*examples)`` to ``path`` at ``opset``: the batch axis of every input (``[B, ...]``) and of the
    output dynamic, every other dim static. ``translations``: the dynamo exporter's custom translations (default
    ``dynamo.translation_table(opset)``, a ViT's). Whatever stops the tracer is an ``ExportError`` naming it.

    Beside ``path`` only ``<name>.data`` is written, for a model over protobuf's 2 GB (the TorchScript exporter
    writes such a model's weights a file per tensor: they are gathered into that one file)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as scratch:
        traced = Path(scratch) / path.name
        try:
            if exporter == "torchscript":
                _trace_torchscript(model, examples, traced, opset, input_names, output_name)
            else:
                _trace_dynamo(model, examples, traced, opset, input_names, output_name, translations)
        except ExportError:
            raise
        except Exception as error:
            other = "dynamo" if exporter == "torchscript" else "torchscript"
            *_, cause = exception_chain(error)  # what the model raised: torch.export wraps it in pages of advice
            raise ExportError(f"tracing to ONNX failed: {type(cause).__name__}: {str(cause).strip()[:600]}",
                              hint=Hint("exporter", other, "instead (it traces the model its own way)")) from error
        if {p.name for p in Path(scratch).iterdir()} <= {traced.name, traced.name + ".data"}:  # weights in one file
            move_files(Path(scratch), path.parent)
        else:  # a file per tensor (TorchScript): into one file
            save_graph(onnx.load(str(traced)), path)


def _trace_torchscript(
    model: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, opset: int, input_names: Sequence[str],
    output_name: str,
) -> None:  # fmt: skip
    axes = {name: {0: "batch"} for name in [*input_names, output_name]}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention (open_clip's towers) takes its fused kernel when no weight needs a gradient, as in a
    # calibration's one-block graphs; that kernel has no ONNX translation, the plain path does
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints are expected: shapes *are* constant
            torch.onnx.export(model, examples, str(path), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=[output_name], dynamic_axes=axes,
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _trace_dynamo(
    model: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, opset: int, input_names: Sequence[str],
    output_name: str, translations: dict | None,
) -> None:  # fmt: skip
    """torch.export (``exporters.dynamo``); says what to install when onnxscript is missing."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError("the dynamo exporter needs onnxscript: pip install onnxscript") from error
    from tofu_export.exporters.dynamo import trace_inputs, translation_table

    table = translation_table(opset) if translations is None else translations
    trace_inputs(model, examples, path, opset, input_names, output_name, table)
