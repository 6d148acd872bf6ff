"""Export through ``torch.export`` (``torch.onnx.export(..., dynamo=True)``), the exporter torch supports.

What this module adds to torch's own exporter, so that its graph is the one ``tofu_export`` ships:

- custom translations (onnxscript): a 2-norm over given axes is ``Sqrt(ReduceSum(x * x))``, not ``ReduceL2``
  (ONNX Runtime's CPU ``ReduceL2`` kernel takes 2.3x as long as the three on a ``[1, 181, 384]`` token block, and
  deit_small's ToFu graph runs 0.5-0.9% faster, ``bench/results/norm_form.md``; TensorRT's importer writes ``ReduceL2``
  as these same three layers); attention transposes K with a static permutation (torch's
  translation reshapes K to 3-D and back: two more nodes per block); ``unbind`` (q, k, v out of the qkv
  projection) is one ``Gather`` per part rather than a ``Slice`` and a ``Squeeze``; exact GELU in the operand order
  ONNX Runtime fuses into one ``Gelu`` kernel (torch's order is not fused, which cost ~2% on ORT CPU); below opset
  17 ``layer_norm`` is decomposed (TensorRT 8.5 has no ``LayerNormalization`` importer);
- torch's exporter works at opset 18: the optimised graph is converted down to the requested opset;
- torch's ONNX function registry (with these translations) is built once per process, not once per export;
- torch's graph optimiser (onnxscript's) runs without a rewrite rule that costs most of its time and never fires on
  torch's graphs (``optimiser_rules``);
- torch's decomposition pass, a second trace of the whole captured graph, is skipped where it would change nothing
  (``decompositions``; about a third of an export's CPU time);
- node names in the TorchScript style, from the module scopes torch records (``/blocks/blocks.3/reduce/GatherND``),
  so that profiles attribute time to blocks and to the token reduction.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from tofu_export.exporters.decompositions import CHECK, check_against_torch, decompositions_where_needed
from tofu_export.exporters.decompositions import TRANSLATIONS as AS_DECOMPOSED
from tofu_export.exporters.optimiser_rules import rewrite_rules_without
from tofu_export.exporters.staging import save_graph
from tofu_export.exporters.weights_aside import put_weights_back, set_weights_aside

EXPORT_OPSET = 18  # the lowest opset torch's dynamo exporter translates to; lower ones are converted down
_METADATA_SCOPES = "pkg.torch.onnx.name_scopes"
_SET_ASIDE = "tofu_export.set_aside"  # a private domain the opset converter leaves alone
Value = Any  # an onnxscript (onnx_ir) value while torch's exporter translates a node


def _attention(
    query: Value,
    key: Value,
    value: Value,
    attn_mask: Value | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Value:
    """``aten.scaled_dot_product_attention`` on ``[B, H, N, D]`` inputs with no mask or an additive float mask
    (proportional attention's ``log(size)``), in torch's own numerics (q and k each scaled by sqrt(scale));
    anything else goes to torch's translation."""
    import onnx_ir as ir
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

    head_dim = query.shape[-1] if query.shape is not None and len(query.shape) == 4 else None
    boolean_mask = attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL
    if is_causal or enable_gqa or dropout_p or boolean_mask or not isinstance(head_dim, int):
        return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    root_scale = op.CastLike(op.Constant(value_float=(head_dim**-0.5 if scale is None else scale) ** 0.5), query)
    logits = op.MatMul(op.Mul(query, root_scale), op.Mul(op.Transpose(key, perm=[0, 1, 3, 2]), root_scale))
    if attn_mask is not None:
        logits = op.Add(logits, attn_mask)
    return op.MatMul(op.Softmax(logits, axis=-1), value)


def _gelu(x: Value, approximate: str = "none") -> Value:
    """``aten.gelu``: exact GELU as ``(x * (erf(x / sqrt 2) + 1)) * 0.5``, the form ONNX Runtime's GeluFusion
    matches (and the TorchScript exporter writes); the tanh approximation goes to torch's translation."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_gelu

    if approximate != "none":
        return aten_gelu(x, approximate)

    def constant(value: float) -> Value:
        return op.CastLike(op.Constant(value_float=value), x)

    return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, constant(2**0.5))), constant(1.0))), constant(0.5))


def _unbind(x: Value, dim: int = 0) -> list[Value]:
    """``aten.unbind`` along a static axis: one ``Gather`` of a scalar index per part, which drops the axis (torch's
    translation writes a ``Slice`` and a ``Squeeze`` per part; ``Split`` has no opset-17 adapter)."""
    from onnxscript import opset18 as op

    parts = x.shape[dim] if x.shape is not None else None
    if not isinstance(parts, int):
        return op.SplitToSequence(x, axis=dim, keepdims=False)
    return [op.Gather(x, op.Constant(value_int=i), axis=dim) for i in range(parts)]


def _vector_norm(
    x: Value, ord: float = 2.0, dim: Sequence[int] | None = None, keepdim: bool = False, dtype: Any = None
) -> Value:
    """``aten.linalg_vector_norm`` (``x.norm(dim=...)``: MLERP's norms, the matching's key normalisation): the 2-norm
    over given axes as ``Sqrt(ReduceSum(x * x))`` (see the module docstring); any other order, a norm over every
    axis or a dtype cast goes to torch's translation."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.linalg import aten_linalg_vector_norm

    if ord != 2 or not dim or dtype not in (None, -1):
        return aten_linalg_vector_norm(x, ord, dim, keepdim, -1 if dtype is None else dtype)
    axes = op.Constant(value_ints=list(dim))
    return op.Sqrt(op.ReduceSum(op.Mul(x, x), axes, keepdims=int(keepdim)))


def _layer_norm_decomposed(
    x: Value,
    normalized_shape: Sequence[int],
    weight: Value | None = None,
    bias: Value | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> Value:
    """``aten.layer_norm`` without ``LayerNormalization`` (opset 17+), for opset-16 graphs: ``x [..., *shape]``."""
    from onnxscript import opset18 as op

    axes = op.Constant(value_ints=list(range(-len(normalized_shape), 0)))
    centred = op.Sub(x, op.ReduceMean(x, axes))
    variance = op.ReduceMean(op.Mul(centred, centred), axes)
    eps_value = op.CastLike(op.Constant(value_float=eps), x)
    out = op.Div(centred, op.Sqrt(op.Add(variance, eps_value)))
    if weight is not None:
        out = op.Mul(out, weight)
    if bias is not None:
        out = op.Add(out, bias)
    return out


def translation_table(opset: int) -> dict:
    """Custom onnxscript translations for an export at ``opset``. None is needed for correctness: the token
    reduction is plain PyTorch, so torch's exporter alone also exports a patched model (with a larger graph)."""
    table: dict = {
        **AS_DECOMPOSED,  # what torch's decomposition would make of two ops, for graphs exported without it
        torch.ops.aten.scaled_dot_product_attention.default: _attention,
        torch.ops.aten.unbind.int: _unbind,
        torch.ops.aten.gelu.default: _gelu,
        torch.ops.aten.linalg_vector_norm.default: _vector_norm,
    }
    if opset < 17:
        table[torch.ops.aten.layer_norm.default] = _layer_norm_decomposed
    return table


def trace_inputs(
    model: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, opset: int, input_names: Sequence[str],
    output_name: str, translations: dict,
) -> None:
    """Export ``model(*examples)`` to ``path`` at ``opset`` with ``translations``: the batch axis of every input and
    of the output dynamic, every other dim static; scope names; converted down from ``EXPORT_OPSET``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    examples = tuple(t.expand(max(2, len(t)), *t.shape[1:]).contiguous() for t in examples)  # a batch of 1 specialises
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opset and deprecation notices; the result is checked after
        shapes = tuple({0: batch} for _ in examples)
        graph = _export(model, examples, list(input_names), [output_name], shapes, translations)
        torch_writes = (_export(model, examples, list(input_names), [output_name], shapes, translations, skip=False)
                        if os.environ.get(CHECK) == "1" else None)
    _name_by_scope(graph)
    if torch_writes is not None:  # a maintainer's check (decompositions.CHECK)
        _name_by_scope(torch_writes)
        check_against_torch(graph, torch_writes)
    if opset < EXPORT_OPSET:
        graph = _convert_down(graph, opset)  # with the weights set aside: a model over 2 GB converts too
    save_graph(graph, path)  # over protobuf's 2 GB: the weights beside it


def _export(model: nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple, translations: dict, *, skip: bool = True) -> onnx.ModelProto:
    """torch's dynamo exporter at ``EXPORT_OPSET``, optimised. ``torch.onnx.export`` builds its ONNX function registry
    anew for every export (~0.4 CPU-s, a tenth of a small model's export); here it is built once per process and
    translation table and handed to the exporter it calls (``_core.export``). Where torch's internals are not the
    ones this was written against, the public ``torch.onnx.export`` does the same work. ``skip``: torch's second
    trace only where it changes something (``decompositions``); False: on every graph, as torch does."""
    where_needed = decompositions_where_needed if skip else contextlib.nullcontext
    try:
        from torch.onnx._internal.exporter import _core
        from torch.onnx._internal.exporter._onnx_program import ONNXProgram

        rename_axes = ONNXProgram._rename_dynamic_axes  # the symbols torch made (s77) -> the Dim names ("batch")
        registry = _registry(tuple(translations.items()))
    except (ImportError, AttributeError, TypeError):  # torch's internals moved: its public call
        with rewrite_rules_without(), where_needed():
            program = torch.onnx.export(model, examples, dynamo=True, opset_version=EXPORT_OPSET,
                                        input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, custom_translation_table=translations,
                                        optimize=True, verbose=False)
    else:
        with rewrite_rules_without(), where_needed():
            program = _core.export(model, examples, registry=registry, dynamic_shapes=dynamic_shapes,
                                   input_names=input_names, output_names=output_names, optimize=True, verbose=False,
                                   opset_version=EXPORT_OPSET)
        rename_axes(program, dynamic_shapes)
    return program.model_proto


@functools.lru_cache(maxsize=8)
def _registry(translations: tuple[tuple[Any, Any], ...]) -> Any:
    """torch's ONNX function registry at ``EXPORT_OPSET`` with ``translations`` (aten op -> onnxscript function)
    registered, as ``torch.onnx.export`` builds it. The exporter only reads it."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset_version=EXPORT_OPSET)
    for torch_op, onnx_op in translations:
        registry.register_op(torch_op, onnx_op, is_complex=False)
    return registry


def _scope_path(scopes: list[str]) -> str:
    """Module scopes ``['', 'blocks', 'blocks.3', 'blocks.3.reduce', 'gather']`` -> ``/blocks/blocks.3/reduce``
    (the TorchScript exporter's naming: a module's attribute name, ``parent.i`` for a container's children)."""
    parts = []
    for scope in scopes[1:-1]:  # drop the root and the op's own name
        *parent, name = scope.split(".")
        parts.append(f"{parent[-1]}.{name}" if name.isdigit() and parent else name)
    return "/" + "/".join(parts) if parts else ""


def _name_by_scope(graph: onnx.ModelProto) -> None:
    """Rename nodes ``<scope>/<OpType>[_k]`` and drop torch's per-node metadata (stack traces, FX nodes)."""
    taken: set[str] = set()
    for node in graph.graph.node:
        meta = {prop.key: prop.value for prop in node.metadata_props}
        scopes = ast.literal_eval(meta[_METADATA_SCOPES]) if _METADATA_SCOPES in meta else []
        base = f"{_scope_path(scopes)}/{node.op_type}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        node.name = name
        del node.metadata_props[:]


def _explicit_split_sizes(graph: onnx.ModelProto) -> None:
    """Opset 18's ``Split(x, num_outputs=n)`` (``chunk``: timm's packed SwiGLU, DINOv2 giant) as ``Split(x, sizes)``
    where the split axis has a static size: the form opsets 13-18 share (opset 18 makes every part ``ceil(size /
    n)`` but the last). A ``Split`` on a dynamic axis is left as it is (the conversion then says so)."""
    import math

    splits = [node for node in graph.graph.node if node.op_type == "Split" and node.domain in ("", "ai.onnx")
              and len(node.input) == 1 and any(a.name == "num_outputs" for a in node.attribute)]
    if not splits:
        return
    inferred = onnx.shape_inference.infer_shapes(graph).graph
    shapes = {v.name: v.type.tensor_type.shape for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    for node in splits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        dims, parts, axis = shapes.get(node.input[0]), int(attrs["num_outputs"]), int(attrs.get("axis", 0))
        if dims is None or not -len(dims.dim) <= axis < len(dims.dim) or not dims.dim[axis].HasField("dim_value"):
            continue
        size = dims.dim[axis].dim_value
        part = math.ceil(size / parts)
        if size - part * (parts - 1) <= 0:
            continue
        sizes = onnx.numpy_helper.from_array(
            np.array([part] * (parts - 1) + [size - part * (parts - 1)], dtype=np.int64), f"{node.name}/split_sizes")
        graph.graph.initializer.append(sizes)
        node.input.append(sizes.name)
        kept = [a for a in node.attribute if a.name != "num_outputs"]
        del node.attribute[:]
        node.attribute.extend(kept)


def _convert_down(graph: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert an opset-18 graph to ``opset``. Opset 18 added ``noop_with_empty_axes`` to the reductions that took
    ``axes`` as an attribute before; at its default (0) it means nothing, and older opsets reject it. Opset 18 also
    added ``num_outputs`` to ``Split``, and ONNX has no adapter for it: a ``Split`` with explicit sizes means the
    same at opsets 13-18, so it is set aside in a private domain while the rest is converted."""
    for node in graph.graph.node:
        kept = [a for a in node.attribute if not (a.name == "noop_with_empty_axes" and a.i == 0)]
        if len(kept) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)
    _explicit_split_sizes(graph)
    splits = [n for n in graph.graph.node if n.op_type == "Split" and n.domain in ("", "ai.onnx")
              and len(n.input) == 2 and not any(a.name == "num_outputs" for a in n.attribute)]
    if opset >= 13 and splits:
        for node in splits:
            node.domain = _SET_ASIDE
        graph.opset_import.append(onnx.helper.make_opsetid(_SET_ASIDE, 1))
    aside = set_weights_aside(graph)  # the converter copies the whole model four times: not its weights
    try:
        converted = onnx.version_converter.convert_version(graph, opset)
    except Exception:
        put_weights_back(graph, aside)
        raise
    put_weights_back(converted, aside)
    for node in converted.graph.node:
        if node.domain == _SET_ASIDE:
            node.domain = ""
    kept_imports = [o for o in converted.opset_import if o.domain != _SET_ASIDE]
    del converted.opset_import[:]
    converted.opset_import.extend(kept_imports)
    return converted
