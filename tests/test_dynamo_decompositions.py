"""torch's decomposition pass skipped where it changes nothing (``exporters.decompositions``): a ToFu graph exported
without it is the graph torch's own exporter writes (up to the names of intermediate values), and a graph that holds
an op to decompose is still decomposed."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tofu_export import patch
from tofu_export.exporters import decompositions, dynamo
from tofu_export.exporters.graph_structure import graph_structure

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread


Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one input, or several


def _export(model: torch.nn.Module, x: Inputs, path: Path, opset: int = 17) -> onnx.ModelProto:
    inputs = x if isinstance(x, tuple) else (x,)
    names = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
    dynamo.trace_inputs(model, inputs, path, opset, names, "output", dynamo.translation_table(opset))
    return onnx.load(str(path))


def _as_torch_exports(model: torch.nn.Module, x: Inputs, path: Path, monkeypatch: pytest.MonkeyPatch,
                      opset: int = 17) -> onnx.ModelProto:
    """The graph of torch's exporter as it is, every captured graph decomposed."""
    with monkeypatch.context() as patched:
        patched.setattr(dynamo, "decompositions_where_needed", contextlib.nullcontext)
        return _export(model, x, path, opset)


def _exported_as_torch_writes_it(module: torch.nn.Module, x: Inputs, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> tuple[onnx.ModelProto, list[str]]:
    """``module`` exported on ``x`` and the ops found to decompose in it, once its graph is checked to be the one
    torch's exporter writes as it is."""
    found = _decomposed(monkeypatch)
    graph = _export(module, x, tmp_path / "ours.onnx")
    assert graph_structure(graph) == graph_structure(_as_torch_exports(module, x, tmp_path / "torch.onnx", monkeypatch))
    assert len(found) == 1  # torch's own path asked nothing
    return graph, found[0]


def _decomposed(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records, per export, the ops ``ops_to_decompose`` found ([] where the second trace was skipped)."""
    found: list[list[str]] = []
    original = decompositions.ops_to_decompose

    def spy(program: torch.export.ExportedProgram, registry: object) -> list[str]:
        found.append(original(program, registry))
        return found[-1]
    monkeypatch.setattr(decompositions, "ops_to_decompose", spy)
    return found


@pytest.mark.parametrize("opset", [17, 16])
def test_a_tofu_graph_is_the_graph_torch_writes_without_the_second_trace(
    make_vit, make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opset: int
) -> None:
    """Every ToFu mode's reduction (flattened indices, reshapes, the one-hot's dtype cast, norms) in two blocks,
    pruning in one; at opset 16 LayerNorm written out too."""
    model = make_vit("deit_tiny_patch16_224", depth=2, img_size=32)
    with pytest.warns(UserWarning, match=r"blocks \[0, 1\] were clipped"):  # 5 tokens: at most 2 a block
        patch(model, r=3, mode="tofu", prune_layers=1, img_size=32)
    x = make_images(2, 32)
    found = _decomposed(monkeypatch)
    skipped = _export(model, x, tmp_path / "skipped.onnx", opset)
    assert found == [[]]  # nothing to decompose: the second trace did not run
    torch_writes = _as_torch_exports(model, x, tmp_path / "torch.onnx", monkeypatch, opset)
    assert len(found) == 1  # torch's own path asked nothing
    assert len(skipped.graph.node) > 100
    assert graph_structure(skipped) == graph_structure(torch_writes)


class _Standardise(torch.nn.Module):
    """``aten.std`` (decomposed: the registry has no translation), a flatten of the batch axis (no earlier node
    gives its size) and a cast to the dtype the tensor has (an alias, removed before the graph is looked at)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - x.mean(dim=-1, keepdim=True)) / x.std(dim=-1, keepdim=True)
        return y.flatten(0, 1).to(torch.float32).reshape(x.shape)


def test_a_graph_with_an_op_to_decompose_is_decomposed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = _decomposed(monkeypatch)
    x = torch.randn(3, 4, 5)
    graph = _export(_Standardise(), x, tmp_path / "std.onnx")
    assert found == [["aten.std.dim", "aten.flatten.using_ints"]]
    torch_writes = _as_torch_exports(_Standardise(), x, tmp_path / "torch.onnx", monkeypatch)
    assert graph_structure(graph) == graph_structure(torch_writes)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], _Standardise()(x).numpy(), atol=1e-5)


class _Flatten(torch.nn.Module):
    """A flatten that keeps the batch axis (its size computed before it) and one that flattens it away."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = x.shape[0]
        return x.flatten(1) * batch, x.flatten(0, 1) * 2


def test_flatten_becomes_the_view_the_second_trace_makes() -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(_Flatten(), (torch.randn(4, 3, 2),), dynamic_shapes=({0: batch},))
    decompositions.as_the_second_trace_leaves_them(program.graph_module)
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.aten.view.default) == 1  # [batch, 6]: batch from the node before it
    assert targets.count(torch.ops.aten.flatten.using_ints) == 1  # [batch * 3, 2]: left to the second trace
    x = torch.randn(5, 3, 2)
    for got, expected in zip(program.module()(x), _Flatten()(x), strict=True):
        assert torch.equal(got, expected)


class _Tails(torch.nn.Module):
    """A reshape of a transposed tensor whose -1 stands for a constant, a flatten that keeps the batch axis, its
    size computed before it, and a chunk into uneven pieces (5 -> 3, 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        swapped = torch.cat(x.chunk(2, dim=-1)[::-1], dim=-1)
        return x.transpose(1, 2).reshape(x.shape[0], -1) * 2 + x.flatten(1) * x.shape[0] + swapped.flatten(1)


def test_reshaped_flattened_and_chunked_tails_are_the_graph_torch_writes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, found = _exported_as_torch_writes_it(_Tails(), torch.randn(3, 4, 5), tmp_path, monkeypatch)
    assert found == []


class _Casts(torch.nn.Module):
    """Casts to the dtype and device a tensor has (aliases: ``to.dtype``, ``to.device`` and ``to.dtype_layout``), a
    cast that is one (bool to float), and an unflatten that keeps the batch axis, its size computed before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x > 0).to(x.dtype)
        y = (x.to(torch.float32) * mask).to(dtype=x.dtype, device=x.device).to(x.device)
        return y.unflatten(2, (2, -1)).sum(2) * x.shape[0]


def test_aliasing_casts_and_unflatten_are_the_graph_torch_writes_without_the_second_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(3, 4, 6)
    graph, found = _exported_as_torch_writes_it(_Casts(), x, tmp_path, monkeypatch)
    assert found == []
    casts = [node.input[0] for node in graph.graph.node if node.op_type == "Cast"]
    assert len(casts) == 2 and "input" not in casts  # the mask's and the batch size's; none of the aliases
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], _Casts()(x).numpy(), atol=1e-6)


class _Copy(torch.nn.Module):
    """A cast to the tensor's own dtype that asks for a copy: not an alias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32, copy=True) * 2


class _CastOut(torch.nn.Module):
    """An aliasing cast that is the graph's output (the exported program names its outputs by their nodes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).to(x.dtype)


@pytest.mark.parametrize("module", [_Copy, _CastOut])
def test_a_cast_that_copies_or_is_an_output_is_left_to_the_second_trace(
    module: type[torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = _decomposed(monkeypatch)
    x = torch.randn(3, 4)
    graph = _export(module(), x, tmp_path / "cast.onnx")
    assert found == [["aten.to.dtype"]]
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], module()(x).numpy())


@pytest.mark.parametrize(("padding", "decomposed"), [("valid", []), ("same", ["aten.conv2d.padding"])])
def test_a_valid_padded_convolution_is_the_graph_torch_writes_without_the_second_trace(
    padding: str, decomposed: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``padding="valid"`` (SigLIP's patch embedding) is padding 0; ``"same"`` is left to the second trace."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=padding).eval()
    x = torch.randn(2, 3, 8, 8)
    graph, found = _exported_as_torch_writes_it(conv, x, tmp_path, monkeypatch)
    assert found == decomposed
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], conv(x).numpy(), atol=1e-5)


class _Borrowed(torch.nn.Module):
    """A ``view`` to ``-1`` with another input's batch size (diffusers' cross-attention, PixArt's caption
    projection): the capture leaves the ``-1``'s size symbolic though it is the constant 4."""

    def __init__(self) -> None:
        super().__init__()
        self.project = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.project(c).view(x.shape[0], -1, 8).sum(1) + x.sum(1)


def test_a_size_left_symbolic_though_constant_is_recorded_as_the_number_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    module, inputs = _Borrowed().eval(), (torch.randn(2, 5, 8), torch.randn(2, 4, 8))
    symbolic: list[str] = []
    rewrite = decompositions.as_the_second_trace_leaves_them

    def recording(graph_module: torch.fx.GraphModule) -> None:
        symbolic.extend(node.name for node in graph_module.graph.nodes if decompositions._constant_symbol(node))
        rewrite(graph_module)
    monkeypatch.setattr(decompositions, "as_the_second_trace_leaves_them", recording)
    graph, found = _exported_as_torch_writes_it(module, inputs, tmp_path, monkeypatch)
    assert symbolic == ["view"] and found == []
    assert [node.op_type for node in graph.graph.node].count("Concat") == 0  # the view's shape is a constant


def test_node_names_taken_from_value_names_are_set_aside_with_them() -> None:
    """Two graphs that differ in a node name without a scope path (a later pass named the node after a value) are
    the same graph; a different scope path is a different graph."""
    def graph(name: str) -> onnx.ModelProto:
        node = onnx.helper.make_node("Relu", ["x"], ["y"], name=name)
        value = [onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, [2]) for v in "xy"]
        return onnx.helper.make_model(onnx.helper.make_graph([node], "g", value[:1], value[1:]))

    assert graph_structure(graph("view_37")) == graph_structure(graph("view_180"))
    assert graph_structure(graph("/blocks/blocks.0/Relu")) != graph_structure(graph("/blocks/blocks.1/Relu"))


def test_without_torchs_internals_every_graph_is_decomposed(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.onnx._internal.exporter import _fx_passes

    original = _fx_passes.decompose_with_registry
    with decompositions.decompositions_where_needed():
        assert _fx_passes.decompose_with_registry is not original
    assert _fx_passes.decompose_with_registry is original  # restored
    monkeypatch.delattr(_fx_passes, "decompose_with_registry")
    with decompositions.decompositions_where_needed():  # nothing to replace: torch's exporter as it is
        assert not hasattr(_fx_passes, "decompose_with_registry")


def test_the_maintainers_check_exports_both_ways_and_names_a_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``TOFU_EXPORT_CHECK_DECOMPOSITIONS=1``: each dynamo export is made both ways and compared; a graph that is not
    torch's is an error naming the node where they part."""
    calls: list[bool] = []
    export = dynamo._export

    def counted(*args: object, skip: bool = True) -> onnx.ModelProto:
        calls.append(skip)
        return export(*args, skip=skip)
    monkeypatch.setattr(dynamo, "_export", counted)
    monkeypatch.setenv(decompositions.CHECK, "1")
    x = torch.randn(3, 4, 5)
    _export(_Tails(), x, tmp_path / "tails.onnx")  # the same graph both ways: no error
    assert calls == [True, False]
    tails, standardised = onnx.load(str(tmp_path / "tails.onnx")), _export(_Standardise(), x, tmp_path / "std.onnx")
    with pytest.raises(RuntimeError, match=r"not torch's graph: at node \d+ of \d+ / \d+"):
        decompositions.check_against_torch(tails, standardised)
