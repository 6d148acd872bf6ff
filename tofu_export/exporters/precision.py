"""Reduced-precision ONNX graphs: FP16 (a strongly typed TensorRT network builds it as it is) and INT8 (explicit
Q/DQ static quantization), with the token reduction kept in FP32 by one rule, and the parity floor per precision.

The rule (:func:`keeps_fp32`): the token-reduction subgraph of every block (``/blocks.N/reduce/``: similarity
scores, TopK, GatherND / one-hot MatMul, MLERP norms) takes discrete decisions from near-tied scores, so it stays
FP32; so do the metric's key norms (``LpNormalization``, ``/attn/k_norm``) and the layer norms (TensorRT warns that
LayerNorm after self-attention overflows in FP16). FP16 graphs have FLOAT16 inputs and outputs (the engine's
bindings); INT8 graphs keep FP32 inputs and outputs and quantize only the linear layers (MatMul / Gemm / Conv with a
constant weight: symmetric INT8, per-channel weights, as TensorRT's explicit quantization expects).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from tofu_export.errors import Hint, UserError
from tofu_export.names import PRECISIONS, Precision
from tofu_export.user_warnings import warn_user

REDUCTION_SCOPE = "/reduce/"  # the static token reduction's module scope (every family names it block.reduce)
FP32_OPS = frozenset({"LpNormalization", "LayerNormalization", "TopK"})
# the layer norms' module names, whose LayerNorm is decomposed below opset 17: timm's; transformers' ViT, CLIP and
# SigLIP (``pre_layrnorm``: CLIP's spelling); open_clip's
NORM_SCOPES = frozenset({
    "norm", "norm1", "norm2", "q_norm", "k_norm", "fc_norm", "norm_pre",
    "layernorm", "layernorm_before", "layernorm_after", "layer_norm1", "layer_norm2", "pre_layrnorm", "post_layernorm",
    "ln_1", "ln_2", "ln_pre", "ln_post",
})  # fmt: skip
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
SYNTHETIC_IMAGES = 32


@dataclass(frozen=True)
class ParityFloor:
    """What the parity gate asks of a graph at one precision, against the FP32 PyTorch model.

    ``relative``: max |diff| per image relative to the output scale (None: the export's ``tolerance``, FP32);
    ``min_within``: fraction of images within it; ``min_cosine``: every image's cosine; ``min_top1``: fraction
    of images with PyTorch's argmax (classifiers only).
    """

    relative: float | None
    min_within: float
    min_cosine: float
    min_top1: float | None


PARITY_FLOORS: dict[str, ParityFloor] = {
    "fp32": ParityFloor(None, 2 / 3, 0.999, None),
    "fp16": ParityFloor(2e-2, 2 / 3, 0.99, 0.9),
    "int8": ParityFloor(1e-1, 0.0, 0.95, 0.75),
}


class PrecisionError(UserError, ValueError):
    """An unknown precision, or a graph that cannot be converted to it."""


def check_precision(precision: str) -> Precision:
    """``precision`` if it is one of :data:`PRECISIONS`, else a :class:`PrecisionError`."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}",
                             hint=Hint("precision", "fp16", "fp32 | fp16 | int8"))  # fmt: skip
    return precision  # type: ignore[return-value]


def keeps_fp32(node: onnx.NodeProto) -> bool:
    """The rule: True for nodes that stay FP32 in an FP16 graph and out of Q/DQ in an INT8 graph."""
    scope = node.name.rsplit("/", 1)[0]
    return (
        REDUCTION_SCOPE in node.name + "/"
        or node.op_type in FP32_OPS
        or scope.rsplit("/", 1)[-1] in NORM_SCOPES
    )


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (``LpNormalization_0``): the converters select nodes by name."""
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes :func:`keeps_fp32` keeps (name the nodes first, :func:`name_nodes`)."""
    return [node.name for node in model.graph.node if keeps_fp32(node)]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP16 graph of ``model`` (FLOAT16 inputs/outputs; the :func:`keeps_fp32` nodes FP32 behind Casts), by
    ONNX Runtime's ``float16`` converter."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    name_nodes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the model has values out of FP16 range": clamped, and reported by parity
        converted = convert_float_to_float16(
            model, keep_io_types=False, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
            node_block_list=fp32_nodes(model),
        )  # fmt: skip
    fold_cast_pairs(converted.graph)
    sort_nodes(converted.graph)  # the converter appends the Casts it inserts at the end of the node list
    return converted


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def fold_cast_pairs(graph: onnx.GraphProto) -> int:
    """Drop the ``Cast(to FP16) -> Cast(to FP32)`` round trips the converter puts between two FP32-kept nodes: the
    second Cast's consumers read the FP32 tensor directly (more exact, and two kernels fewer). Returns how many
    Casts were removed."""
    outputs = {info.name for info in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed: set[int] = set()
    for first in graph.node:
        if _cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        for second in consumers.get(first.output[0], []):
            if _cast_to(second) != onnx.TensorProto.FLOAT or second.output[0] in outputs:
                continue
            for reader in consumers.get(second.output[0], []):
                reader.input[:] = [first.input[0] if name == second.output[0] else name for name in reader.input]
                consumers.setdefault(first.input[0], []).append(reader)
            removed.add(id(second))
        if first.output[0] not in outputs and all(id(n) in removed for n in consumers.get(first.output[0], [])):
            removed.add(id(first))
    kept = [node for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    return len(removed)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so that every node comes after the producers of its inputs (stable otherwise)."""
    available = {info.name for info in graph.input} | {init.name for init in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise PrecisionError(f"the converted graph has a cycle or a dangling input at {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in ready_ids]
    copies = [onnx.NodeProto.FromString(node.SerializeToString()) for node in ordered]
    del graph.node[:]
    graph.node.extend(copies)


class ImageReader:
    """An ONNX Runtime ``CalibrationDataReader`` over ``images [N, C, H, W]`` in batches of ``batch``."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 8) -> None:
        self.input_name, self.images, self.batch = input_name, images.astype(np.float32), batch
        self._batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = iter([self.images[i : i + self.batch] for i in range(0, len(self.images), self.batch)])


def synthetic_images(img_size: tuple[int, int], count: int = SYNTHETIC_IMAGES, seed: int = 0) -> np.ndarray:
    """``[count, 3, H, W]`` standard-normal images (the scale of normalised pixels): a last resort for calibration."""
    return np.random.default_rng(seed).standard_normal((count, 3, *img_size)).astype(np.float32)


def to_int8(source: Path, destination: Path, images: np.ndarray, symmetric: bool = True) -> None:
    """Quantize ``source`` into ``destination``: QDQ format, per-channel symmetric INT8 weights of the constant-weight
    MatMul / Gemm / Conv nodes, activations calibrated (min/max) on ``images [N, 3, H, W]``; the :func:`keeps_fp32`
    nodes are excluded. ``symmetric``: INT8 activations with zero point 0, the only form TensorRT builds; otherwise
    asymmetric UINT8 activations, ONNX Runtime CPU's fast path (U8S8), which keeps more of the range after GELU."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(source))
    name_nodes(model)
    input_name = model.graph.input[0].name
    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
    try:
        quantize_static(
            model, str(destination), ImageReader(input_name, images), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=fp32_nodes(model),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True, "MatMulConstBOnly": True,
                           "QuantizeBias": False},  # TensorRT dequantizes INT8 only: biases stay float
        )  # fmt: skip
    finally:
        root.setLevel(level)


def quantize_file(
    path: Path, img_size: tuple[int, int], images: torch.Tensor | None, symmetric: bool = True
) -> tuple[torch.Tensor, str | None]:
    """Quantize the FP32 graph at ``path`` in place (:func:`to_int8`) on ``images [N, 3, H, W]``, or on synthetic
    images with a loud note when None; returns the images used and the note."""
    note = None
    if images is None:
        pixels = synthetic_images(img_size)
        note = (f"INT8 was calibrated on {len(pixels)} SYNTHETIC random images, not real ones: activation ranges may "
                "not match real inputs. Pass an image folder (--data) to calibrate on real images.")
        warn_user(note, RuntimeWarning)
    else:
        pixels = images.float().numpy()
    fp32 = path.with_name(f"fp32-{path.name}")
    os.replace(path, fp32)
    try:
        to_int8(fp32, path, pixels, symmetric)
    except Exception as error:  # onnxruntime.quantization raises plain exceptions from deep inside
        raise PrecisionError(f"INT8 quantization failed: {type(error).__name__}: {error}") from error
    finally:
        fp32.unlink(missing_ok=True)
    return torch.from_numpy(pixels), note
