"""Static-path export: a patched deit_small (4 blocks, 160 px) traced to ONNX has static token counts, no scatter or
control flow, and runs in ONNX Runtime at any batch size with PyTorch's numbers."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from tofu_export import patch, token_schedule
from tofu_export.exporters.trace import trace_graph

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning:torch.onnx"),
]

FORBIDDEN_OPS = {"ScatterElements", "ScatterND", "Scatter", "If", "Loop", "NonZero"}
BATCH = "batch"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

@dataclass(frozen=True)
class Exported:
    """A patched model and its ONNX export."""

    model: VisionTransformer
    path: Path
    proto: onnx.ModelProto
    img_size: int


def export(
    model: nn.Module, example: Tensor, path: Path, opset: int = 17, exporter: str = "torchscript"
) -> onnx.ModelProto:
    """The raw export (no simplifier), dynamic batch axis only: the TorchScript tracer, or torch.export through
    ``tofu_export.exporters.dynamo`` (its custom translations, scope names and opset conversion)."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    trace_graph(model, (example,), path, opset, ["input"], "logits", exporter)
    return onnx.load(str(path))


def infer_symbolic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of every tensor, with the batch axis kept as a symbol (ONNX Runtime's symbolic shape inference).

    It follows the tracer's Shape/Gather/Concat arithmetic, so a dim it cannot name (data-dependent, e.g. after
    NonZero) comes out unknown or as a fresh symbol. ``onnx.shape_inference`` alone cannot follow that arithmetic
    (it already loses plain timm's class-token ``expand``), so its unknown dims would be false alarms.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=False, guess_output_rank=False)
    assert inferred is not None, "symbolic shape inference gave up"
    return inferred


def dims_of(info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Dims as ints (static), strings (symbolic) or None (unknown); None for an unknown rank."""
    if not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in info.type.tensor_type.shape.dim]


def non_static_dims(inferred: onnx.ModelProto) -> dict[str, list[int | str | None] | None]:
    """Node outputs with a dim that is neither a constant nor an expression of the batch symbol alone."""
    graph = inferred.graph
    infos = {info.name: info for info in [*graph.value_info, *graph.output]}
    problems: dict[str, list[int | str | None] | None] = {}
    for name in (name for node in graph.node for name in node.output if name):
        dims = dims_of(infos[name]) if name in infos else None
        if dims is None or any(
            d is None or (isinstance(d, str) and set(_IDENTIFIER.findall(d)) - {BATCH}) for d in dims
        ):
            problems[name] = dims
    return problems


def run_ort(path: Path, images: Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": images.numpy()})[0]


@pytest.fixture(scope="module", params=[("tofu", "torchscript"), ("tome", "torchscript"), ("tofu", "dynamo")],
                ids=["tofu-torchscript", "tome-torchscript", "tofu-dynamo"])
def exported(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    make_vit: Callable[..., VisionTransformer],
    make_images: Callable[..., Tensor],
    single_thread: None,
) -> Exported:
    """deit_small_patch16_224's width and heads (random init), 4 blocks at 160 px (101 tokens), patched with r=24 on
    the static path and exported once per mode and exporter. The last block has 29 tokens, so its r is cut to 14:
    every property below is checked on full-r blocks and on a clamped one, as in a 12-block model at 224 px."""
    mode, exporter = request.param
    model = make_vit("deit_small_patch16_224", depth=4, img_size=160)
    with pytest.warns(UserWarning, match=r"r=24 is more than block 3 can remove.*blocks \[3\] were clipped"):
        patch(model, r=24, mode=mode, img_size=160)
    path = tmp_path_factory.mktemp(f"export-{mode}-{exporter}") / "deit_small.onnx"
    proto = export(model, make_images(1, 160, seed=7), path, exporter=exporter)
    return Exported(model, path, proto, 160)


@pytest.mark.slow
def test_graph_passes_the_full_onnx_checker(exported: Exported) -> None:
    onnx.checker.check_model(exported.proto, full_check=True)


@pytest.mark.slow
def test_graph_has_no_scatter_or_data_dependent_control_flow(exported: Exported) -> None:
    ops = {node.op_type for node in exported.proto.graph.node}
    assert not ops & FORBIDDEN_OPS
    assert "TopK" in ops, "the matching step is missing from the graph"
    reduce_ops = {node.op_type for node in exported.proto.graph.node if "/reduce/" in node.name}
    assert reduce_ops & {"Gather", "GatherND"}, "tokens should be taken as whole rows, not element by element"


@pytest.mark.slow
def test_batch_indices_are_built_once_per_graph(exported: Exported) -> None:
    """Every block's gathers share one ``arange(B)``: per-block batch-size arithmetic is the reduction's main node
    overhead on ONNX Runtime's CPU provider."""
    ranges = [node for node in exported.proto.graph.node if node.op_type == "Range"]
    assert len(ranges) == 1


@pytest.mark.slow
def test_only_the_batch_axis_is_dynamic(exported: Exported) -> None:
    inferred = infer_symbolic(exported.proto)
    assert non_static_dims(inferred) == {}
    shapes = {tuple(dims_of(info) or ()) for info in inferred.graph.value_info}
    schedule = token_schedule(exported.model)
    for tokens in schedule.tokens[1:]:  # every block's reduced token count is a constant of the graph
        assert (BATCH, tokens, 384) in shapes


@pytest.mark.slow
def test_onnxruntime_matches_pytorch_at_two_batch_sizes(exported: Exported, make_images: Callable[..., Tensor]) -> None:
    for batch in (1, 4):
        images = make_images(batch, exported.img_size, seed=batch)
        with torch.no_grad():
            expected = exported.model(images).numpy()
        got = run_ort(exported.path, images)
        assert got.shape == expected.shape == (batch, 1000)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_tensorrt_10_compatibility_check_passes(exported: Exported) -> None:
    from tofu_export.tensorrt import check as trt_check

    # Opset 17 keeps LayerNorm as LayerNormalization, native from TensorRT 8.6: JetPack 5 needs opset 16 (below).
    report = trt_check.check_tensorrt_compat(exported.path, targets=("10",))
    assert report.ok, report.render()


@pytest.mark.slow
@pytest.mark.parametrize(  # tofu (prune_layers=1: prune + mlerp) and tome (mean) cover every mode for dynamo
    ("mode", "exporter"),
    [(mode, "torchscript") for mode in ("tofu", "tome", "prune", "mlerp")] + [("tofu", "dynamo"), ("tome", "dynamo")],
)
def test_opset16_export_of_every_mode_builds_on_both_jetpacks(
    tmp_path: Path,
    make_vit: Callable[..., VisionTransformer],
    make_images: Callable[..., Tensor],
    mode: str,
    exporter: str,
) -> None:
    from tofu_export.tensorrt import check as trt_check

    model = make_vit("deit_small_patch16_224", depth=3, img_size=64)
    patch(model, r=3, mode=mode, img_size=64, prune_layers=1 if mode == "tofu" else None)
    path = tmp_path / f"{mode}.onnx"
    proto = export(model, make_images(1, 64), path, opset=16, exporter=exporter)
    assert not {node.op_type for node in proto.graph.node} & FORBIDDEN_OPS
    assert non_static_dims(infer_symbolic(proto)) == {}
    report = trt_check.check_tensorrt_compat(path, targets=("8.5", "10"))
    assert report.ok, report.render()
    images = make_images(3, 64, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(path, images), model(images).numpy(), rtol=0, atol=1e-4)


def test_shape_check_flags_data_dependent_dims() -> None:
    """The static-shape assertion is not vacuous: a NonZero output's length is caught."""
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["idx"]), helper.make_node("Transpose", ["idx"], ["y"])],
        "data_dependent",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [BATCH, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    problems = non_static_dims(infer_symbolic(proto))
    assert set(problems) == {"idx", "y"}


@pytest.mark.slow
def test_attention_pool_head_exports_with_its_size_weights(
    tmp_path: Path, make_vit: Callable[..., VisionTransformer], make_images: Callable[..., Tensor]
) -> None:
    """A MAP head (SigLIP's) weighs the merged tokens by size in the exported graph too: ``log(size)`` reaches the
    pool's attention (a ``Log`` outside the blocks), and ONNX Runtime gives PyTorch's numbers at two batch sizes."""
    model = make_vit("test_vit3", depth=2, img_size=64)
    patch(model, r=4, mode="tofu", img_size=64)
    path = tmp_path / "map.onnx"
    proto = export(model, make_images(1, 64), path, exporter="dynamo")
    assert not {node.op_type for node in proto.graph.node} & FORBIDDEN_OPS
    assert [node.name for node in proto.graph.node if node.op_type == "Log" and not node.name.startswith("/blocks/")]
    for batch in (1, 3):
        images = make_images(batch, 64, seed=batch)
        with torch.no_grad():
            expected = model(images).numpy()
        np.testing.assert_allclose(run_ort(path, images), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("exporter", "other"), [("torchscript", "dynamo"), ("dynamo", "torchscript")])
def test_a_model_an_exporter_cannot_trace_is_an_error_naming_the_other_exporter(tmp_path: Path, exporter: str,
                                                                                other: str) -> None:
    """The two exporters trace differently (TorchScript cannot trace timm's unpatched Eva; dynamo refuses other
    things): a failed trace says to try the other one."""
    from tofu_export.errors import ExportError

    class Refuses(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise TypeError("argument 'is_causal' must be bool, not Tensor")

    with pytest.raises(ExportError, match="tracing to ONNX failed: TypeError: argument 'is_causal'") as caught:
        trace_graph(Refuses(), (torch.zeros(2, 3),), tmp_path / "m.onnx", 17, ["input"], "output", exporter)
    assert caught.value.hint is not None and (caught.value.hint.option, caught.value.hint.value) == ("exporter", other)
    assert "\x1b[" not in str(caught.value) and len(str(caught.value)) < 200  # the model's error, not torch's pages
    assert list(tmp_path.iterdir()) == []  # nothing left behind
