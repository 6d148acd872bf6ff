"""A model patched through the Python API exports with torch's own ``torch.onnx.export``, under both exporters.

This is what a user does after ``tofu_export.patch(model, r=..., img_size=...)`` without tofu-export's exporter: the
token reduction must be plain PyTorch (no custom op that only tofu-export knows how to translate).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tofu_export

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def patched(make_vit: Callable[..., VisionTransformer]) -> VisionTransformer:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64)  # block 1 merges tokens of size > 1
    return tofu_export.patch(model, r=3, img_size=64)  # the README's call: MLERP in every block, static


def _check_runs_like_pytorch(path: Path, model: VisionTransformer, make_images: Callable[..., torch.Tensor]) -> None:
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert not any(node.domain.startswith("tofu_export") for node in graph.graph.node)  # nothing only we know
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 3):  # the batch axis stayed dynamic
        images = make_images(batch, 64, seed=batch)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(None, {name: images.numpy()})[0]
        assert got.shape == expected.shape == (batch, 1000)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_torch_dynamo_exporter(
    patched: VisionTransformer, make_images: Callable[..., torch.Tensor], tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript")
    path = tmp_path / "dynamo.onnx"
    x = make_images(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(patched, (x,), str(path), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    _check_runs_like_pytorch(path, patched, make_images)


def test_torch_torchscript_exporter(
    patched: VisionTransformer, make_images: Callable[..., torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "torchscript.onnx"
    x = make_images(2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(patched, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    _check_runs_like_pytorch(path, patched, make_images)
