"""Cheap checks of an ONNX file before anything parses it deeply (ONNX Runtime, shape inference, TensorRT).

A path a user hands to ``check``, ``profile``, ``eval`` or an engine runner is checked here first: it exists, is a
file, is not empty, parses as an ONNX ``ModelProto`` (weights stored outside the file are not loaded, but they
must exist), and holds a graph with nodes, outputs and an opset; with ``image_input`` the graph must also take
one ``[B, C, H, W]`` image. Every failure is one :class:`OnnxFileError` naming the file and what to do.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import onnx

from tofu_export.errors import Hint, UserError
from tofu_export.profiling.device import available_memory

MAX_INPUT_PIXELS = 64_000_000  # per image (the image module's decode limit)
ACTIVATION_FACTOR = 32  # a ViT's peak activations over its float32 input, roughly (batch memory estimate)

_REEXPORT = "Export it again (tofu-export export) or pass the model.onnx of an artifact folder."


class OnnxFileError(UserError):
    """A file that is not a usable ONNX model: missing, empty, truncated, not ONNX, or without an image input."""


def check_onnx_file(path: str | Path, *, image_input: bool = False) -> onnx.ModelProto:
    """The parsed model (external weights not loaded) of ``path``, or :class:`OnnxFileError` saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise OnnxFileError(f"ONNX file {path} does not exist. {_REEXPORT}")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.onnx"))[:3]
        also = f" It contains {', '.join(inside)}; pass one of those." if inside else ""
        raise OnnxFileError(f"{path} is a folder, not an ONNX file.{also}")
    if path.stat().st_size == 0:
        raise OnnxFileError(f"ONNX file {path} is empty (0 bytes): it was not written completely. {_REEXPORT}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf DecodeError, or onnx's own wrappers of it
        raise OnnxFileError(f"{path} is not an ONNX model, or it is truncated or corrupt (it does not parse: "
                            f"{type(error).__name__}). {_REEXPORT}") from error
    _check_graph(model, path)
    _check_external_data(model, path)
    if image_input:
        image_input_shape(model, path)
    return model


def _check_graph(model: onnx.ModelProto, path: Path) -> None:
    graph = model.graph
    if not graph.node or not graph.output:
        raise OnnxFileError(f"{path} parses but holds no graph (no nodes or no outputs): it is not an ONNX model "
                            f"or it is truncated. {_REEXPORT}")
    if not model.opset_import:
        raise OnnxFileError(f"{path} declares no opset, so it is truncated or was not written by an ONNX exporter. "
                            f"{_REEXPORT}")


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Weights stored beside the file (models over 2 GB) must be there, as regular files inside its folder (a
    location such as ``../../etc/passwd`` or ``/dev/zero`` would read a file that is not the model's)."""
    folder = os.path.realpath(path.parent)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(location) or not target.startswith(folder + os.sep):
            raise OnnxFileError(f"{path} keeps the weights of {tensor.name!r} at {location!r}, outside its own folder; "
                                "ONNX external data must lie beside the model. Re-export it, or fix the file.")
        if os.path.exists(target) and not stat.S_ISREG(os.stat(target).st_mode):
            raise OnnxFileError(f"{path} keeps its weights in {location!r}, which is not a regular file.")
        if not (path.parent / location).is_file():
            raise OnnxFileError(f"{path} keeps its weights in {path.parent / location}, which is missing: copy "
                                "that file next to the model too.")


def image_input_shape(model: onnx.ModelProto, path: Path) -> list[int | str]:
    """``[B, C, H, W]`` of the graph's one non-weight input (B may be symbolic), or :class:`OnnxFileError`."""
    weights = {init.name for init in model.graph.initializer}
    inputs = [info for info in model.graph.input if info.name not in weights]
    if len(inputs) != 1:
        raise OnnxFileError(f"{path} takes inputs {[info.name for info in inputs]}; tofu-export runs models with "
                            "exactly one image input [B, C, H, W].")
    dims = inputs[0].type.tensor_type.shape.dim
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise OnnxFileError(f"input {inputs[0].name!r} of {path} has shape {shape}; expected an image [B, C, H, W] "
                            "with static C, H, W. Re-export with a fixed image size.")
    channels, height, width = (int(d) for d in shape[1:])
    if channels > 16 or height * width > MAX_INPUT_PIXELS:
        raise OnnxFileError(f"input {inputs[0].name!r} of {path} is [B, {channels}, {height}, {width}]: more than "
                            f"{MAX_INPUT_PIXELS // 1_000_000} M pixels or 16 channels per image, far beyond any ViT "
                            "input (one image alone would not fit in memory). Re-export at the model's image size.")
    return shape


def check_batch_fits(shape: list[int | str], batch: int, path: Path) -> None:
    """Refuse a batch whose input alone, times a ViT's usual activation factor, exceeds the memory available now."""
    per_image = 4 * math.prod(int(d) for d in shape[1:])  # float32 [C, H, W]
    need = batch * per_image * ACTIVATION_FACTOR
    available = available_memory()
    if available is not None and need > available:
        fits = available // (per_image * ACTIVATION_FACTOR)
        what = f"batch {batch} of {path}'s [{', '.join(map(str, shape[1:]))}] input needs about {need / 2**30:.1f} GiB"
        if fits == 0:
            raise OnnxFileError(f"{what}: not even one image fits in the {available / 2**30:.1f} GiB available. "
                                "Re-export the model at its usual image size.")
        raise OnnxFileError(f"{what}; this machine has {available / 2**30:.1f} GiB available",
                            hint=Hint("batch", str(fits), "or less"))
