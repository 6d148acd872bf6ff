"""Models over protobuf's 2 GB (ViT-H/14 in fp32, a Stable Diffusion UNet) export with their weights in one
``model.onnx.data`` beside the graph. Here the limit is lowered so that a tiny ViT is "large": the same code path,
in seconds. Before, any such model ended in an internal ``EncodeError`` from protobuf on both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tofu_export import patch
from tofu_export.exporters import simplify
from tofu_export.exporters.onnx import export_onnx

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_graph_over_the_limit_keeps_its_weights_in_one_file_beside_it(exporter, make_vit, tmp_path,
                                                                          monkeypatch) -> None:
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64)
    patch(model, r=2, mode="tofu", prune_layers=1, img_size=64)
    weights = sum(t.numel() * 4 for t in model.state_dict().values())
    monkeypatch.setattr(simplify, "WEIGHTS_LIMIT", weights // 2)  # the graph holds them all: over the limit
    out = tmp_path / "artifact" / "model.onnx"
    result = export_onnx(model, out, 64, exporter=exporter, opset=16)
    assert result.external_data and result.parity.ok
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    graph = onnx.load(str(out), load_external_data=False)
    assert graph.opset_import[0].version == 16
    outside = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert outside and {e.value for t in outside for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}
    stored = sum(onnx.numpy_helper.to_array(t, base_dir=str(out.parent)).nbytes for t in outside)
    data = out.parent / "model.onnx.data"
    assert data.stat().st_size < 1.1 * stored  # written once, not appended to
    assert data.stat().st_mode == out.stat().st_mode  # as readable as the graph (onnx makes it owner-only)
    assert "simplification skipped: the model is larger than 2 GB" in " ".join(result.notes)


def test_the_size_is_the_initializers_bytes(monkeypatch) -> None:
    """Summed from the initializers, raw or listed (protobuf raises instead of sizing a graph over 2 GB)."""
    raw = onnx.numpy_helper.from_array(np.zeros(1000, np.float32), "raw")  # 4000 bytes of raw_data
    listed = onnx.helper.make_tensor("listed", onnx.TensorProto.FLOAT, [250], [0.0] * 250)  # 1000 bytes, float_data
    graph = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [], [raw, listed]))
    monkeypatch.setattr(simplify, "WEIGHTS_LIMIT", 5000)
    assert not simplify.over_protobuf_limit(graph)
    monkeypatch.setattr(simplify, "WEIGHTS_LIMIT", 4999)
    assert simplify.over_protobuf_limit(graph)


def test_a_graph_that_fits_once_converted_leaves_no_data_file(make_vit, tmp_path, monkeypatch) -> None:
    """Over the limit as traced, under it in FP16 (ViT-H/14: 2.5 GB, then 1.3): one file, no stale weights beside."""
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=64)
    patch(model, r=2, mode="tofu", img_size=64)
    weights = sum(t.numel() * 4 for t in model.state_dict().values())
    monkeypatch.setattr(simplify, "WEIGHTS_LIMIT", int(weights * 0.7))  # FP32 over it, FP16 under it
    out = tmp_path / "artifact" / "model.onnx"
    result = export_onnx(model, out, 64, exporter="dynamo", precision="fp16", opset=17)
    assert not result.external_data and result.parity.ok
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]

