"""Dynamo translations a denoiser step needs beyond the ViT table (``exporters.dynamo.translation_table``).

diffusers' GEGLU feed-forward splits its projection in two (``chunk``, core ATen ``split.Tensor``). torch's
translation writes a ``SplitToSequence`` that its optimiser turns into an opset-18 ``Split`` with ``num_outputs``,
for which ONNX has no down-conversion adapter, so an opset-17 or -16 export fails. Along a static axis the split is
written here as one constant ``Slice`` per part: the same at every opset TensorRT parses, and native to it.

PixArt ``squeeze(1)``s its ``[B, N, C]`` output, a no-op in PyTorch when ``N > 1``; torch's translation writes a
``Squeeze`` of that axis anyway, which ONNX shape inference rejects. A static axis that is not 1 is left alone here.
"""

from __future__ import annotations

import itertools

import torch


def _split(x, split_size: int, dim: int = 0):
    """``aten.split.Tensor(x, split_size, dim)`` along a static axis: one ``Slice`` per part."""
    from onnxscript import opset18 as op

    length = x.shape[dim] if x.shape is not None else None
    if not isinstance(length, int) or not isinstance(split_size, int):
        return op.SplitToSequence(x, op.Constant(value_int=split_size), axis=dim)
    bounds = [*range(0, length, split_size), length]
    axes = op.Constant(value_ints=[dim])
    return [op.Slice(x, op.Constant(value_ints=[start]), op.Constant(value_ints=[end]), axes)
            for start, end in itertools.pairwise(bounds)]


def _squeeze_dim(x, dim: int):
    """``aten.squeeze.dim``: an ``Identity`` when the axis is static and not 1 (PyTorch leaves it), else ``Squeeze``."""
    from onnxscript import opset18 as op

    shape = x.shape
    if shape is None or len(shape) == 0:
        return op.Identity(x)
    size = shape[dim]
    if isinstance(size, int) and size != 1:
        return op.Identity(x)
    return op.Squeeze(x, op.Constant(value_ints=[dim]))


def denoiser_translations(opset: int) -> dict:
    """The ViT translation table for ``opset`` plus the denoiser's own."""
    from tofu_export.exporters.dynamo import translation_table

    return {**translation_table(opset), torch.ops.aten.split.Tensor: _split,
            torch.ops.aten.squeeze.dim: _squeeze_dim}
