"""The ONNX exporter's own guarantees: parity is measured honestly and a failed export leaves nothing behind."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import timm
import torch

import tofu_export
from tofu_export.exporters.onnx import ExportError, OnnxExport, export_onnx
from tofu_export.exporters.parity import parity_advice, parity_notes, verify_parity


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    return tofu_export.patch(model, r=4, mode="tofu", img_size=64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    """``_tiny(0)`` exported with the default settings (the dynamo exporter), shared by the tests that read it."""
    return export_onnx(_tiny(0), tmp_path_factory.mktemp("onnx_export") / "m.onnx", 64)


def test_parity_of_a_faithful_export(exported: OnnxExport) -> None:
    result = exported
    parity = result.parity
    assert parity is not None and parity.ok
    assert parity.batch_sizes == [1, 8]
    assert parity.images_within_tolerance == 1.0 and parity.min_cosine > 0.99999
    assert parity.max_abs_diff <= 1e-4 * max(1.0, parity.output_scale)


def test_parity_catches_a_different_model(exported: OnnxExport) -> None:
    parity = verify_parity(_tiny(1), exported.path, (64, 64))
    assert not parity.ok
    assert parity.images_within_tolerance == 0.0 and parity.min_cosine < 0.999
    assert "raise --tolerance" in parity_advice(parity) and "near-tied" not in parity_advice(parity)
    # most images agree and one is below the cosine floor: near-tied matches, and the fix is a milder reduction
    ties = dataclasses.replace(parity, images_within_tolerance=0.89, min_cosine=0.996)
    assert "near-tied" in parity_advice(ties) and "reduce less" in parity_advice(ties)
    assert "raise --tolerance" in parity_advice(dataclasses.replace(ties, precision="fp16"))  # FP16 rounds more
    # a passing graph with images over the tolerance gets a note naming the cause: ties, and a lower precision first
    passing = dataclasses.replace(ties, ok=True, max_abs_diff=0.5, min_cosine=0.9961)
    assert parity_notes(passing) == ["11% of the parity images differ by more than the tolerance (up to 0.5, cosine "
                                     ">= 0.9961000): near-tied token matches resolved differently by ONNX Runtime "
                                     "and PyTorch, whose float rounding differs."]
    int8 = parity_notes(dataclasses.replace(passing, precision="int8"))[0]
    assert "): the int8 graph's rounding against the FP32 model, and near-tied token matches" in int8
    assert parity_notes(dataclasses.replace(passing, images_within_tolerance=1.0)) == []


def test_failed_parity_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="nothing was written"):  # the exporter does not matter: the cheaper one
        export_onnx(_tiny(0), tmp_path / "m.onnx", 64, tolerance=0.0, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_unknown_exporter_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown exporter 'jit'"):
        export_onnx(_tiny(0), tmp_path / "m.onnx", 64, exporter="jit")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_dynamo_export_keeps_parity_scopes_and_a_dynamic_batch(exported: OnnxExport) -> None:
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    import onnx
    import onnxruntime as ort

    from tofu_export.profiling.breakdown import categorize

    result = exported
    assert result.exporter == "dynamo" and result.parity is not None and result.parity.ok
    assert result.parity.batch_sizes == [1, 8]  # one graph served both batch sizes
    graph = onnx.load(str(result.path)).graph
    assert result.op_counts.get("GatherND", 0) > 0  # tokens taken as rows (aten.index on x.flatten(0, 1), no custom op)
    reduce_nodes = [node for node in graph.node if node.name.startswith("/blocks/blocks.1/reduce/")]
    assert {node.op_type for node in reduce_nodes} >= {"TopK", "GatherND"}
    assert all(categorize(node.name, node.op_type) == "token_reduction" for node in reduce_nodes)
    assert not any(node.metadata_props for node in graph.node), "torch's stack traces should not ship"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # batch is a symbol, not the example's size
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": torch.randn(3, 3, 64, 64).numpy()})[0].shape == (3, 1000)
