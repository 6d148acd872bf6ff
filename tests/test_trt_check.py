"""Static TensorRT compatibility check on hand-built ONNX graphs and on a real timm ViT export."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

from tofu_export.tensorrt.check import TrtCompatReport, check_tensorrt_compat
from tofu_export.tensorrt.ops import TARGET_LABELS, TOPK_MAX_K
from tofu_export.tensorrt.targets import UnknownTargetError


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _float(name: str, shape: list[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _clean_model(opset: int = 17, x_shape: tuple[int | str, ...] = ("batch", 4, 8)) -> onnx.ModelProto:
    """``x [B, 4, 8] @ W [8, 8] -> softmax -> y [B, 4, 8]``."""
    weight = numpy_helper.from_array(np.ones((8, 8), np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
        helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1),
    ]
    return _model(nodes, [_float("x", list(x_shape))], [_float("y", ["batch", 4, 8])], [weight], opset)


def _errors(report: TrtCompatReport, target: str) -> list[str]:
    return [i.node for i in report.issues if i.severity == "error" and i.target == target]


def test_clean_dynamic_batch_graph_is_ok_on_both_targets() -> None:
    report = check_tensorrt_compat(_clean_model())
    assert report.ok
    assert report.per_target == {"8.5": True, "10": True}
    assert report.issues == []
    assert report.opset == 17
    assert report.op_counts == {"MatMul": 1, "Softmax": 1}


@pytest.mark.parametrize(("reduction", "flagged"), [("add", True), ("mul", True), ("none", False)])
@pytest.mark.parametrize("op_type", ["ScatterElements", "ScatterND"])
def test_scatter_reduction_is_an_error_on_every_target(op_type: str, reduction: str, flagged: bool) -> None:
    indices_shape = (2, 4) if op_type == "ScatterElements" else (2, 1)  # updates are [2, 4] for both
    indices = numpy_helper.from_array(np.zeros(indices_shape, np.int64), "idx")
    node = helper.make_node(op_type, ["x", "idx", "upd"], ["y"], name="scatter", reduction=reduction)
    inputs = [_float("x", [3, 4]), _float("upd", [2, 4])]
    model = _model([node], inputs, [_float("y", [3, 4])], [indices])
    report = check_tensorrt_compat(model)
    scatter_errors = [i for i in report.issues if i.op_type == op_type and i.severity == "error"]
    assert sorted(i.target for i in scatter_errors) == (["10", "8.5"] if flagged else [])
    assert report.ok is not flagged
    if flagged:
        assert all(reduction in i.message and i.node == "scatter" for i in scatter_errors)


def test_nonzero_is_flagged_as_data_dependent() -> None:
    nodes = [helper.make_node("NonZero", ["x"], ["y"], name="nz")]
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [2, None])
    model = _model(nodes, [_float("x", [2, 3])], [y])
    report = check_tensorrt_compat(model)
    assert not report.ok
    flagged = [i for i in report.issues if i.op_type == "NonZero"]
    assert {i.target for i in flagged} == {"8.5", "10"}
    assert all("data-dependent" in i.message and i.node == "nz" for i in flagged)


def test_if_is_flagged_as_data_dependent() -> None:
    def branch(name: str, value: float) -> onnx.GraphProto:
        tensor = helper.make_tensor("v", TensorProto.FLOAT, [1], [value])
        const = helper.make_node("Constant", [], [f"{name}_out"], value=tensor)
        return helper.make_graph([const], name, [], [_float(f"{name}_out", [1])])

    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=branch("t", 1.0),
                            else_branch=branch("e", 0.0))  # fmt: skip
    model = _model([node], [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [_float("y", [1])])
    report = check_tensorrt_compat(model)
    assert report.per_target == {"8.5": False, "10": False}
    assert any(i.op_type == "If" and "control flow" in i.message for i in report.issues)


def test_symbolic_non_batch_dim_is_flagged_with_tensor_name() -> None:
    report = check_tensorrt_compat(_clean_model(x_shape=("batch", "tokens", 8)))
    assert not report.ok
    x_issues = [i for i in report.issues if i.node == "x"]
    assert {i.target for i in x_issues} == {"8.5", "10"}
    assert all("axis 1" in i.message and "tokens" in i.message for i in x_issues)


def test_static_graph_without_batch_symbol_is_ok() -> None:
    model = _clean_model(x_shape=(2, 4, 8))
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert check_tensorrt_compat(model).ok


def _int64_add_model(constant: int) -> onnx.ModelProto:
    """``ids [B, 3] (int64) + c [3] -> y``, plus a Slice whose ``ends`` is INT64_MAX (clamping is exact)."""
    int64 = TensorProto.INT64
    inits = [
        numpy_helper.from_array(np.full(3, constant, np.int64), "c"),
        numpy_helper.from_array(np.array([1], np.int64), "starts"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Add", ["ids", "c"], ["y"], name="add"),
        helper.make_node("Slice", ["y", "starts", "ends", "axes"], ["z"], name="slice"),
    ]
    ids = helper.make_tensor_value_info("ids", int64, ["batch", 3])
    z = helper.make_tensor_value_info("z", int64, ["batch", 2])
    return _model(nodes, [ids], [z], inits)


def test_int64_initializer_outside_int32_is_an_error_where_tensorrt_casts_down() -> None:
    report = check_tensorrt_compat(_int64_add_model(2**31 + 5))
    assert _errors(report, "8.5") == ["c"]  # "ends" = INT64_MAX feeds Slice only: not flagged
    assert _errors(report, "10") == []  # TensorRT >= 9 has native INT64
    assert report.per_target == {"8.5": False, "10": True}
    warnings = [i for i in report.issues if i.severity == "warning"]
    assert {(i.node, i.target) for i in warnings} == {("ids", "8.5"), ("ids", "10")}


def test_int64_initializer_inside_int32_is_fine() -> None:
    report = check_tensorrt_compat(_int64_add_model(7))
    assert report.ok
    assert {i.severity for i in report.issues} == {"warning"}


def test_double_tensor_is_an_error() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    double = TensorProto.DOUBLE
    x, y = (helper.make_tensor_value_info(n, double, ["batch", 4]) for n in ("x", "y"))
    report = check_tensorrt_compat(_model(nodes, [x], [y]))
    assert report.per_target == {"8.5": False, "10": False}
    assert {i.node for i in report.issues if "DOUBLE" in i.message} == {"x", "y"}


@pytest.mark.parametrize(("k", "flagged"), [(TOPK_MAX_K + 1, True), (TOPK_MAX_K, False)])
def test_topk_k_limit(k: int, flagged: bool) -> None:
    k_init = numpy_helper.from_array(np.array([k], np.int64), "k")
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", axis=1)
    outputs = [_float("values", [2, k]), helper.make_tensor_value_info("indices", TensorProto.INT64, [2, k])]
    report = check_tensorrt_compat(_model([node], [_float("x", [2, 5000])], outputs, [k_init]))
    topk_errors = [i for i in report.issues if i.op_type == "TopK"]
    assert len(topk_errors) == (2 if flagged else 0)
    assert all(str(k) in i.message for i in topk_errors)


def test_unsupported_and_custom_ops_name_the_op_and_node() -> None:
    nodes = [
        helper.make_node("Det", ["x"], ["d"], name="det_node"),
        helper.make_node("FancyOp", ["x"], ["f"], name="custom_node", domain="com.example"),
    ]
    outputs = [_float("d", [2]), _float("f", [2, 3, 3])]
    model = _model(nodes, [_float("x", [2, 3, 3])], outputs)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    report = check_tensorrt_compat(model)
    by_node = {(i.node, i.op_type, i.target) for i in report.issues if i.severity == "error"}
    assert {("det_node", "Det", "8.5"), ("det_node", "Det", "10")} <= by_node
    assert {("custom_node", "FancyOp", "8.5"), ("custom_node", "FancyOp", "10")} <= by_node
    assert "FAIL" in report.render() and "det_node" in report.render()


@pytest.mark.parametrize(("opset", "expected"), [(12, {"8.5": False, "10": False}),
                                                 (18, {"8.5": False, "10": True})])  # fmt: skip
def test_opset_range_per_target(opset: int, expected: dict[str, bool]) -> None:
    report = check_tensorrt_compat(_clean_model(opset=opset))
    assert report.opset == opset
    assert report.per_target == expected
    assert all(i.node == "opset" for i in report.issues)


def test_single_target_and_unknown_target() -> None:
    report = check_tensorrt_compat(_int64_add_model(2**40), targets=["10"])
    assert report.ok and report.per_target == {"10": True}
    with pytest.raises(UnknownTargetError, match=r"7\.1"):
        check_tensorrt_compat(_clean_model(), targets=["7.1"])


def test_report_to_dict_is_json_and_render_names_both_targets() -> None:
    report = check_tensorrt_compat(_int64_add_model(2**31 + 5))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["per_target"] == {"8.5": False, "10": True}
    assert len(data["issues"]) == len(report.issues)
    text = report.render()
    assert f"{TARGET_LABELS['8.5']}: FAIL (1 error)" in text
    assert f"{TARGET_LABELS['10']}: OK" in text


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """A random-init 2-block ViT-Tiny at 32 px exported with a dynamic batch axis at opsets 16 and 17."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    paths = {}
    for opset in (16, 17):
        path = tmp_path_factory.mktemp("vit") / f"vit_op{opset}.onnx"
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
        paths[opset] = path
    return paths


def test_timm_vit_opset16_is_ok_on_both_targets(vit_onnx: dict[int, Path]) -> None:
    report = check_tensorrt_compat(vit_onnx[16])
    assert report.ok, report.render()
    assert report.op_counts["MatMul"] >= 4 and report.op_counts["Softmax"] == 2
    text = report.render()
    assert TARGET_LABELS["8.5"] in text and TARGET_LABELS["10"] in text


def test_timm_vit_opset17_needs_tensorrt10_for_layernorm(vit_onnx: dict[int, Path]) -> None:
    """Opset 17 keeps LayerNormalization, which TensorRT 8.5 lacks (onnx-tensorrt release/8.5-GA: "N")."""
    report = check_tensorrt_compat(str(vit_onnx[17]))
    assert report.per_target == {"8.5": False, "10": True}, report.render()
    assert {i.op_type for i in report.issues if i.severity == "error"} == {"LayerNormalization"}
    assert len(_errors(report, "8.5")) == report.op_counts["LayerNormalization"] == 5


def test_failed_symbolic_inference_warns_and_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    nodes = [helper.make_node("FancyOp", ["x"], ["y"], name="custom_node", domain="com.example")]
    model = _model(nodes, [_float("x", ["batch", 3])], [_float("y", ["batch", 3])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    report = check_tensorrt_compat(model)
    assert any(i.severity == "warning" and "shape inference" in i.message for i in report.issues)
    assert list(tmp_path.iterdir()) == []


def test_jetpack7_and_tensorrt_10_13_use_the_conservative_10_table() -> None:
    from tofu_export.tensorrt.targets import resolve_targets, validate_targets

    assert resolve_targets(jetpack=["7"]) == resolve_targets(trt=["10.13"]) == ("10",)
    assert validate_targets(["10.13", "8.5.2", "10"]) == ("10", "8.5")
    with pytest.raises(UnknownTargetError, match="'11'"):
        validate_targets(["11"])


def test_the_manifest_record_is_ok_when_the_releases_it_was_made_for_build() -> None:
    """One meaning of ``ok`` for every producer: the releases the artifact was made for (all checked ones when none
    were named); each checked release keeps its own verdict."""
    from tofu_export.tensorrt.issues import TrtIssue

    missing = TrtIssue("error", "8.5", "LayerNormalization", "ln", "not in TensorRT 8.5")
    report = TrtCompatReport(targets=("8.5", "10"), opset=17, op_counts={"LayerNormalization": 1}, issues=[missing])
    made_for_10 = report.record(build_for=["10"])
    assert made_for_10.ok and made_for_10.build_for == ["10"]
    assert made_for_10.per_target == {"8.5": False, "10": True} and made_for_10.issues == [missing]
    assert not report.record(build_for=["8.5", "10"]).ok
    assert not report.record(build_for=[]).ok and report.record(build_for=[]).requested == ["8.5", "10"]
