"""The dynamo exporter's ``Split`` nodes survive the conversion from opset 18 down to 17 and 16.

ONNX's version converter has no adapter for opset 18's ``Split``. Two forms reach it: ``Split(x, sizes)``
(``split_with_sizes``: ToFu's own reduction, and SigLIP's attention-pool head, whose ``nn.MultiheadAttention``
splits its packed in-projection into q and kv when the query is a probe: the cause of SigLIP's "No Adapter From
Version $18 for Split"), set aside while the rest is converted; and ``Split(x, num_outputs=n)`` (``chunk``: timm's
packed SwiGLU in DINOv2 giant), rewritten with explicit sizes where the axis is static.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from tofu_export.exporters.onnx import export_onnx
from tofu_export.exporters.trace import trace_graph
from tofu_export.models.family import patch
from tofu_export.tensorrt.check import check_tensorrt_compat

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore")]

FORBIDDEN_OPS = {"ScatterElements", "ScatterND", "Scatter", "If", "Loop", "NonZero"}
TRT = {17: ("10",), 16: ("8.5", "10")}


class Chunks(torch.nn.Module):
    """``chunk`` into uneven parts (10 -> 4, 4, 2) on the last axis and even ones on axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4, 6] -> [B, 2, 4]
        a, b, c = self.proj(x).chunk(3, dim=-1)
        top, bottom = (a * torch.sigmoid(b)).chunk(2, dim=1)
        return top + bottom + c[:, :2].sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("opset", [17, 16])
def test_chunk_splits_are_given_explicit_sizes(opset: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Chunks().eval(), torch.randn(3, 4, 6)
    trace_graph(model, (x,), tmp_path / "chunks.onnx", opset, ["input"], "output", "dynamo")
    graph = onnx.load(str(tmp_path / "chunks.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    splits = [node for node in graph.graph.node if node.op_type == "Split"]
    assert len(splits) == 2 and all(len(node.input) == 2 for node in splits)
    session = onnxruntime.InferenceSession(str(tmp_path / "chunks.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=0, atol=1e-6)


class Norms(torch.nn.Module):
    """2-norms over one and two axes (written out), a 1-norm and a norm over every axis (torch's translations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4, 6] -> [B, 4, 1]
        return (x.norm(dim=-1, keepdim=True) + x.norm(dim=(1, 2)).reshape(-1, 1, 1)
                + x.norm(p=1, dim=-1, keepdim=True) + x.norm())


def test_two_norms_over_given_axes_are_written_out_and_the_rest_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Norms().eval(), torch.randn(3, 4, 6)
    trace_graph(model, (x,), tmp_path / "norms.onnx", 17, ["input"], "output", "dynamo")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "norms.onnx")).graph.node]
    assert ops.count("ReduceL2") == 1 and ops.count("ReduceL1") == 1  # x.norm() and the 1-norm: torch's own
    assert ops.count("Sqrt") == 2 and ops.count("ReduceSum") == 2  # the two 2-norms over given axes
    session = onnxruntime.InferenceSession(str(tmp_path / "norms.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-6, atol=1e-6)


def _checked_export(model: torch.nn.Module, path: Path, img_size: int, opset: int) -> None:
    result = export_onnx(model, path, img_size, exporter="dynamo", opset=opset)
    assert result.parity is not None and result.parity.ok
    assert not set(result.op_counts) & FORBIDDEN_OPS and "TopK" in result.op_counts and "Split" in result.op_counts
    report = check_tensorrt_compat(path, TRT[opset])
    assert report.ok, report.render()


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 16])
def test_timm_packed_swiglu_exports_through_dynamo(opset: int, tmp_path: Path) -> None:
    """DINOv2 giant's MLP (``SwiGLUPacked``: one fc1, ``chunk(2)``), ToFu-patched, at opsets 17 and 16."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=5.33334,
                              mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, num_classes=5).eval()
    patch(model, r=2, mode="tofu", img_size=32)
    _checked_export(model, tmp_path / "model.onnx", 32, opset)


@pytest.mark.slow
@pytest.mark.parametrize("opset", [17, 16])
def test_siglip_exports_through_dynamo(opset: int, tmp_path: Path) -> None:
    """``SiglipVisionModel`` (attention-pool head; block 0 prunes, block 1 merges with MLERP) with the default
    exporter: parity, static ops, TensorRT check."""
    transformers = pytest.importorskip("transformers")
    from tofu_export.models.hf_vit import wrap

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, image_size=32, patch_size=4)
    model = wrap(transformers.SiglipVisionModel(config))
    patch(model, r=8, mode="tofu", img_size=32, prune_layers=1)
    _checked_export(model, tmp_path / "model.onnx", 32, opset)


def test_the_registry_built_once_gives_the_graph_torch_onnx_export_gives() -> None:
    """``dynamo._export`` hands torch's exporter a function registry built once per process; the graph is the one
    the public ``torch.onnx.export`` (which builds the registry for every export) makes with the same table, and
    the second export in a process reuses the first one's registry."""
    import torch.onnx._internal.exporter._registration as registration

    from tofu_export.exporters import dynamo

    torch.manual_seed(0)
    model, x = Chunks().eval(), torch.randn(3, 4, 6)
    shapes, table = ({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo.translation_table(17)
    dynamo._export(model, (x,), ["input"], ["output"], shapes, table)  # the registry of this table, built
    built = []
    with pytest.MonkeyPatch.context() as patcher:
        original = registration.ONNXRegistry.from_torchlib.__func__
        patcher.setattr(registration.ONNXRegistry, "from_torchlib",
                        classmethod(lambda cls, *a, **k: built.append(1) or original(cls, *a, **k)))
        ours = dynamo._export(model, (x,), ["input"], ["output"], shapes, table)
        assert built == []  # reused
        with dynamo.decompositions_where_needed():  # the same second-trace rule as dynamo._export's
            public = torch.onnx.export(model, (x,), dynamo=True, opset_version=dynamo.EXPORT_OPSET,
                                       input_names=["input"], output_names=["output"], dynamic_shapes=shapes,
                                       custom_translation_table=table, optimize=True, verbose=False).model_proto
        assert built == [1]  # torch.onnx.export builds one for every export
    for graph in (ours, public):
        graph.ClearField("producer_version")
        for node in graph.graph.node:
            del node.metadata_props[:]
    assert ours.SerializeToString() == public.SerializeToString()
