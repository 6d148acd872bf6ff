"""FP16 and INT8 graphs: the FP32-keeping rule, on hand-made nodes and on a real exported ToFu graph; the FP16
conversion's cast clean-up; INT8 Q/DQ placement; the parity gate per precision; the config fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper

import tofu_export
from tofu_export.config import ExportConfig, OnnxConfig, TrtConfig
from tofu_export.errors import UserError
from tofu_export.exporters import precision
from tofu_export.exporters.onnx import ExportError, export_onnx
from tofu_export.exporters.parity import verify_parity
from tofu_export.tensorrt.build import read_image_input
from tofu_export.tensorrt.check import check_tensorrt_compat

IMG = 64


@pytest.mark.parametrize(("name", "op_type", "kept"), [
    ("/blocks/blocks.0/reduce/TopK", "TopK", True),
    ("/blocks/blocks.3/reduce/MatMul_2", "MatMul", True),  # the one-hot merge
    ("/blocks/blocks.3/reduce/ReduceL2", "ReduceL2", True),  # MLERP norms
    ("/blocks/blocks.1/reduce/GatherND_1", "GatherND", True),
    ("/blocks/blocks.0/attn/k_norm/ReduceL2", "ReduceL2", True),  # the metric's key norm
    ("LpNormalization_0", "LpNormalization", True),
    ("/blocks/blocks.0/norm1/ReduceMean", "ReduceMean", True),  # LayerNorm decomposed at opset 16
    ("/norm/LayerNormalization", "LayerNormalization", True),
    ("/hf/layers.0/layernorm_before/ReduceMean", "ReduceMean", True),  # transformers' ViT, opset 16
    ("/hf/encoder/layers.0/layer_norm2/Pow", "Pow", True),  # CLIP, SigLIP
    ("/hf/pre_layrnorm/Sub", "Sub", True),
    ("/hf/post_layernorm/Sqrt", "Sqrt", True),
    ("/transformer/resblocks.0/ln_1/ReduceMean", "ReduceMean", True),  # open_clip
    ("/ln_post/Div", "Div", True),
    ("/blocks/blocks.0/attn/qkv/MatMul", "MatMul", False),
    ("/blocks/blocks.0/attn/Softmax", "Softmax", False),
    ("/blocks/blocks.0/mlp/fc1/MatMul", "MatMul", False),
    ("/blocks/blocks.0/reducer/MatMul", "MatMul", False),  # only the exact scope
    ("/head/Gemm", "Gemm", False),
])  # fmt: skip
def test_the_fp32_rule(name: str, op_type: str, kept: bool) -> None:
    assert precision.keeps_fp32(helper.make_node(op_type, ["a"], ["b"], name=name)) is kept


def _cast(source: str, output: str, to: int, name: str) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [output], to=to, name=name)


def test_cast_round_trips_are_folded_and_nodes_sorted() -> None:
    """``x -> A(fp32) -> Cast16 -> Cast32 -> B(fp32)`` becomes ``A -> B``; a Cast16 that also feeds an FP16 node
    stays; the nodes are then put in topological order."""
    nodes = [
        helper.make_node("Relu", ["c32"], ["y"], name="B"),  # out of order on purpose
        helper.make_node("Neg", ["c16"], ["z"], name="half"),
        _cast("c16", "c32", TensorProto.FLOAT, "cast32"),
        _cast("a", "c16", TensorProto.FLOAT16, "cast16"),
        helper.make_node("Abs", ["x"], ["a"], name="A"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT16, [2])],
    )  # fmt: skip
    assert precision.fold_cast_pairs(graph) == 1
    precision.sort_nodes(graph)
    assert [node.name for node in graph.node] == ["A", "B", "cast16", "half"]  # ready nodes keep their order
    assert list(graph.node[2].input) == ["a"]
    onnx.checker.check_model(helper.make_model(graph), full_check=True)


def test_sort_nodes_rejects_a_dangling_input() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["missing"], ["y"], name="r")], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])  # fmt: skip
    with pytest.raises(precision.PrecisionError, match="dangling"):
        precision.sort_nodes(graph)


@pytest.fixture(scope="module")
def tofu_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    # 10 classes: a random 1000-class head's top logits are near-tied, and the top-1 floor would test noise
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=IMG, num_classes=10).eval()
    return tofu_export.patch(model, r=2, mode="tofu", img_size=IMG)


@pytest.fixture(scope="module")
def exported(tofu_vit: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One FP16 and two INT8 exports (synthetic / given calibration images) of the same tiny ToFu ViT."""
    folder = tmp_path_factory.mktemp("precision")
    images = torch.randn(16, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="SYNTHETIC"):
        synthetic = export_onnx(tofu_vit, folder / "int8s.onnx", IMG, exporter="torchscript", precision="int8")
    return {
        "fp16": export_onnx(tofu_vit, folder / "fp16.onnx", IMG, exporter="torchscript", precision="fp16"),
        "int8": export_onnx(tofu_vit, folder / "int8.onnx", IMG, exporter="torchscript", precision="int8",
                            calibration=images),
        "int8_synthetic": synthetic,
        "int8_ort": export_onnx(tofu_vit, folder / "int8u8.onnx", IMG, exporter="torchscript", precision="int8",
                                calibration=images, int8_symmetric=False),
    }


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
    return {info.name: info.type.tensor_type.elem_type for info in infos}


def test_fp16_graph_keeps_the_reduction_fp32(exported: dict) -> None:
    result = exported["fp16"]
    model = onnx.load(str(result.path))
    types = _types(model)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16  # documented: FP16 I/O
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    reduction = [node for node in model.graph.node if "/reduce/" in node.name and node.op_type != "Cast"]
    assert {"TopK", "Gather", "ReduceL2", "MatMul"} <= {node.op_type for node in reduction}  # TorchScript: row Gather
    for node in reduction:  # every float tensor the reduction computes is FP32 (Casts out of it aside)
        float_outputs = [types[o] for o in node.output if types.get(o) in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        assert TensorProto.FLOAT16 not in float_outputs, node.name
    qkv = next(node for node in model.graph.node if node.name.endswith("attn/qkv/MatMul"))
    assert types[qkv.output[0]] == TensorProto.FLOAT16
    casts = [node for node in model.graph.node if node.op_type == "Cast"]
    assert len(casts) < 30  # the converter's Cast16 -> Cast32 round trips were folded (221 before)
    assert result.parity.ok and result.parity.precision == "fp16" and result.parity.min_cosine >= 0.99
    assert read_image_input(result.path).precision == "fp16"
    assert check_tensorrt_compat(result.path, ("10",)).ok


def test_int8_graph_is_explicit_qdq_outside_the_reduction(exported: dict) -> None:
    result = exported["int8"]
    model = onnx.load(str(result.path))
    producers = {output: node for node in model.graph.node for output in node.output}
    dequantized = {name for name, node in producers.items() if node.op_type == "DequantizeLinear"}
    quantized = [node for node in model.graph.node
                 if node.op_type in precision.QUANTIZED_OPS and dequantized & set(node.input)]
    names = {node.name for node in quantized}
    assert any(name.endswith("attn/qkv/MatMul") for name in names) and any("mlp/fc2" in n for n in names)
    assert not [name for name in names if "/reduce/" in name]  # the reduction is kept out of Q/DQ
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = next(i for i in model.graph.initializer if i.name == node.input[2])
            assert zero_point.data_type == TensorProto.INT8  # symmetric INT8, as TensorRT wants
            assert not onnx.numpy_helper.to_array(zero_point).any()
    weight_scales = [i for i in model.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1]
    assert {192, 3 * 192, 4 * 192, 10} <= {int(i.dims[0]) for i in weight_scales}  # per channel: proj, qkv, fc1, head
    assert result.parity.ok and result.parity.precision == "int8" and result.notes == []
    assert result.parity.ort_optimization == "basic"  # TensorRT's graph: its Q/DQ arithmetic, not ORT's fused kernels
    assert read_image_input(result.path).precision == "int8"
    assert check_tensorrt_compat(result.path, ("10",)).ok


def test_asymmetric_int8_is_for_ort_and_the_trt_check_says_so(exported: dict) -> None:
    """UINT8 activations (ONNX Runtime CPU's fast path) pass parity, but TensorRT takes only symmetric INT8."""
    result = exported["int8_ort"]
    model = onnx.load(str(result.path))
    zero_points = {i.data_type for i in model.graph.initializer if i.name.endswith("_zero_point")}
    assert TensorProto.UINT8 in zero_points and result.parity.ok
    assert result.parity.ort_optimization == "all"  # ORT's graph: checked through the fused kernels that run it
    report = check_tensorrt_compat(result.path, ("10",))
    assert not report.ok
    assert {issue.op_type for issue in report.issues if issue.severity == "error"} == {"QuantizeLinear",
                                                                                         "DequantizeLinear"}
    assert "symmetric INT8" in report.issues[0].message


def test_int8_without_images_says_so(exported: dict) -> None:
    notes = exported["int8_synthetic"].notes
    assert len(notes) == 1 and "SYNTHETIC" in notes[0] and "--data" in notes[0]


def test_export_calibrates_int8_on_the_data_folder_without_the_quick_look(tmp_path: Path) -> None:
    """``export --precision int8 --data DIR --no-bench``: DIR's images calibrate the graph and are its parity inputs
    (they were dropped when the quick look was off, and synthetic images calibrated it)."""
    import json

    from PIL import Image
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from tofu_export.cli import app

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=IMG, num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "deit_tiny_patch16_224"}))
    for i in range(6):
        (tmp_path / "images" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (IMG, IMG, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / str(i % 3) / f"{i}.png")
    args = ["export", str(tmp_path / "model.safetensors"), "--r", "2", "--precision", "int8", "--data",
            str(tmp_path / "images"), "--no-bench", "--exporter", "torchscript", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not [note for note in manifest["notes"] if "SYNTHETIC" in note]
    parity = manifest["onnx"]["parity"]
    assert parity["precision"] == "int8" and parity["batch_sizes"] == [6] and parity["ok"]  # the folder's 6 images


def test_int8_calibrates_on_calibration_data_else_on_the_commands_data() -> None:
    from tofu_export.cli.options import OnnxOptions

    assert OnnxOptions(precision="int8", calibration_data=Path("c")).build(Path("d")).calibration_data == Path("c")
    assert OnnxOptions(precision="int8").build(Path("d")).calibration_data == Path("d")  # export's --data
    assert OnnxOptions(precision="int8").build().calibration_data is None  # synthetic, with a note
    assert OnnxOptions().build(Path("d")).calibration_data is None  # an FP32 graph calibrates on nothing
    with pytest.raises(UserError, match="--calibration-data calibrates an INT8 graph"):
        OnnxOptions(precision="fp16", calibration_data=Path("c")).build()


def test_parity_gate_holds_each_precision_to_its_floor(exported: dict, tofu_vit: torch.nn.Module) -> None:
    """The FP16 graph passes its own floor, but not FP32's tolerance; a different model fails both, clearly."""
    path = exported["fp16"].path
    fp16 = verify_parity(tofu_vit, path, (IMG, IMG), precision="fp16")
    assert fp16.ok and fp16.tolerance == precision.PARITY_FLOORS["fp16"].relative
    strict = verify_parity(tofu_vit, path, (IMG, IMG), precision="fp32", tolerance=1e-7)
    assert not strict.ok and strict.images_within_tolerance < 2 / 3
    torch.manual_seed(5)
    other = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=IMG, num_classes=10).eval()
    tofu_export.patch(other, r=2, mode="tofu", img_size=IMG)
    wrong = verify_parity(other, path, (IMG, IMG), precision="fp16")
    assert not wrong.ok and wrong.min_cosine < 0.99


def test_failed_gate_names_the_precision_and_writes_nothing(
    tofu_vit: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impossible = precision.ParityFloor(2e-2, 2 / 3, 1.01, None)  # a cosine no graph reaches
    monkeypatch.setitem(precision.PARITY_FLOORS, "fp16", impossible)
    with pytest.raises(ExportError, match=r"the fp16 graph .* FP32 PyTorch model.*\(1\.01 needed\)"):
        export_onnx(tofu_vit, tmp_path / "m.onnx", IMG, exporter="torchscript", precision="fp16", simplify=False)
    assert list(tmp_path.iterdir()) == []


def test_precision_config() -> None:
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        OnnxConfig(precision="int4")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="unknown simplifier"):
        OnnxConfig(simplifier="polygraphy")  # type: ignore[arg-type]
    # TensorRT >= 10 takes the precision from the graph: --fp16 for an engine asks for an FP16 graph
    assert ExportConfig(trt=TrtConfig(fp16=True), target="trt").onnx.precision == "fp16"
    int8 = ExportConfig(onnx=OnnxConfig(precision="int8"), trt=TrtConfig(fp16=True), target="trt")
    assert int8.onnx.precision == "int8"
    with pytest.raises(precision.PrecisionError):
        precision.check_precision("bf16")


def test_image_reader_batches_and_rewinds() -> None:
    reader = precision.ImageReader("input", np.zeros((10, 3, 4, 4), np.float32), batch=4)
    sizes = [len(batch["input"]) for batch in iter(reader.get_next, None)]
    reader.rewind()
    assert sizes == [4, 4, 2] and reader.get_next() is not None
