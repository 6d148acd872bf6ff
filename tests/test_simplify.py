"""Graph simplification: onnxslim by default (its graph passes parity and the TensorRT static check), onnxsim or none
by choice, a missing simplifier kept as a note, module scopes kept for profiles and the precision rule."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
import timm
import torch

import tofu_export
from tofu_export.exporters.onnx import ExportError, export_onnx
from tofu_export.exporters.simplify import simplify_graph
from tofu_export.names import DEFAULT_SIMPLIFIER
from tofu_export.tensorrt.check import check_tensorrt_compat

IMG = 64


@pytest.fixture(scope="module")
def tofu_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=IMG).eval()
    return tofu_export.patch(model, r=2, mode="tofu", img_size=IMG)


@pytest.fixture(scope="module")
def raw(tofu_vit: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("simplify") / "raw.onnx"
    export_onnx(tofu_vit, path, IMG, exporter="torchscript", simplify=False, verify=False)
    return onnx.load(str(path))


def test_default_is_onnxslim_and_its_graph_passes_parity_and_the_trt_check(
    tofu_vit: torch.nn.Module, tmp_path: Path
) -> None:
    assert DEFAULT_SIMPLIFIER == "onnxslim"
    result = export_onnx(tofu_vit, tmp_path / "slim.onnx", IMG, exporter="torchscript")
    assert (result.simplifier, result.simplified, result.notes) == ("onnxslim", True, [])
    assert result.parity.ok and result.parity.min_cosine >= 0.999
    report = check_tensorrt_compat(result.path, ("10",))
    assert report.ok, report.render()


@pytest.mark.parametrize("simplifier", ["onnxslim", "onnxsim"])
def test_simplifiers_shrink_the_graph_and_keep_scopes(raw: onnx.ModelProto, simplifier: str) -> None:
    pytest.importorskip(simplifier)
    simplified, note = simplify_graph(raw, simplifier)  # type: ignore[arg-type]
    assert note is None and len(simplified.graph.node) < len(raw.graph.node)
    reduce_ops = {node.op_type for node in simplified.graph.node if "/reduce/" in node.name}
    assert {"TopK", "Gather"} <= reduce_ops  # the precision rule and the profiles still find the reduction (row Gather)
    assert all(node.name for node in simplified.graph.node)


def test_none_and_a_missing_simplifier(raw: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch) -> None:
    assert simplify_graph(raw, "none") == (raw, None)
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # `import onnxsim` raises ImportError
    graph, note = simplify_graph(raw, "onnxsim")
    assert graph is raw and note is not None and "onnxsim is not installed" in note and "pip install onnxsim" in note


def test_unknown_simplifier(tofu_vit: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown simplifier 'polygraphy'"):
        export_onnx(tofu_vit, tmp_path / "m.onnx", IMG, simplifier="polygraphy")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
