"""torch's decomposition pass, skipped on the graphs where it would change nothing.

torch's dynamo exporter captures a model with ``torch.export`` and then traces the captured graph a second time to
decompose what its ONNX registry cannot translate (``ExportedProgram.run_decompositions``), before it translates.
On the graphs tofu-export exports that second trace costs more than the capture (exporting the DINOv2 ViT-S/14 with
ToFu at r=16: 8.5 of 21.6 CPU-s, the capture 4.9) and changes little: it turns ``reshape``, ``flatten`` and
``unflatten`` into views (a ``-1`` resolved where it stands for a constant), a ``chunk`` into the ``split`` it calls
and a ``to`` to another dtype into a ``_to_copy``, writes a ``conv2d`` with ``padding="valid"`` (SigLIP's) as the
convolution with padding 0, drops a ``to`` that changes nothing (an alias: the transformers DINOv2's, open_clip's
and diffusers' casts to the dtype a tensor has) and evaluation-mode dropouts and ``contiguous``.
``as_the_second_trace_leaves_them`` makes those rewrites on the captured graph and ``TRANSLATIONS`` translates what
is left as its replacement would be; the ONNX graph is then the graph torch writes, node for node (value names
aside): every dynamo export of the test suite, compared with ``TOFU_EXPORT_CHECK_DECOMPOSITIONS=1`` (below; 62
exports, 48 skipped before ``chunk`` was rewritten too; since the aliases, ``unflatten``, valid padding and
constant sizes are rewritten as well, of the graphs the test workers export themselves only those with an ``std``,
a copying cast or a ``"same"`` padding take the second trace).

Inside ``decompositions_where_needed()`` the second trace is skipped for a captured graph whose every op is

- an assertion (the exporter removes those next), or arithmetic on symbolic sizes, or
- translated by the registry, mutates nothing, and is either not a CompositeImplicitAutograd op, or one that
  the second trace keeps (``_is_preservable_cia_op``), or one rewritten or translated here (a ``to.dtype`` to
  another dtype), or dropout in evaluation or ``contiguous``,

and whose every output size the capture left symbolic is one that is not a constant (``_constant_symbol``; such
sizes are recorded as numbers first, as the second trace would: a ``view`` to ``-1`` with another input's batch
size, as diffusers' cross-attention and PixArt's caption projection write it, leaves one, and only with the number
does the graph optimiser write that reshape's shape as a constant). Any other graph (an ``std``, a flatten of the
batch axis into another, a ``to`` that copies, a ``conv2d`` with ``padding="same"``) is decomposed as torch does
it; where torch keeps these internals elsewhere, every graph is. ``TOFU_EXPORT_CHECK_DECOMPOSITIONS=1 make test``
makes every dynamo export of the suite both ways and fails the test whose graph differs (``check_against_torch``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import onnx
import torch

from tofu_export.exporters.graph_structure import graph_structure

CHECK = "TOFU_EXPORT_CHECK_DECOMPOSITIONS"  # "1": every dynamo export is also made torch's way and compared
Value = Any  # an onnxscript (onnx_ir) value while torch's exporter translates a node
_TO = (torch.ops.aten.to.dtype, torch.ops.aten.to.device, torch.ops.aten.to.dtype_layout)  # x.to(...) each way
_VIEWS = (torch.ops.aten.flatten.using_ints, torch.ops.aten.unflatten.int)  # each a view where it can be one
_ASSERTIONS = ("_assert_scalar.default", "_assert_tensor_metadata.default", "_assert_async.default",
               "_assert_async.msg", "sym_constrain_range_for_size.default")


def _view(x: Value, size: Any) -> Value:
    """``aten.reshape`` as the second trace leaves it, ``aten.view``: a ``Reshape`` with ``allowzero=1`` (torch's
    shapes never copy a dim from a 0). For the reshapes ``as_the_second_trace_leaves_them`` cannot rewrite."""
    from onnxscript.function_libs.torch_lib.ops.core import aten_view

    return aten_view(x, size)


def _to_dtype(x: Value, dtype: Any, non_blocking: bool = False, copy: bool = False, memory_format: Any = None) -> Value:
    """``aten.to.dtype`` as the second trace leaves it, ``aten._to_copy``: a ``Cast``."""
    from onnxscript.function_libs.torch_lib.ops.core import aten__to_copy

    return aten__to_copy(x, dtype=dtype)


TRANSLATIONS: dict = {torch.ops.aten.reshape.default: _view, torch.ops.aten.to.dtype: _to_dtype}


def ops_to_decompose(program: torch.export.ExportedProgram, registry: Any) -> list[str]:
    """The ops of ``program``'s graph that the second trace would change (by the rules of the module docstring),
    each once, in graph order: an empty list means the graph can be translated as captured."""
    from torch._export.utils import _is_cia_op, _is_preservable_cia_op
    from torch.onnx._internal.exporter import _decomp

    translated = set(_decomp.get_onnx_implemented_overloads(registry))
    found: dict[str, None] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and (not _as_captured(node, translated, _is_cia_op, _is_preservable_cia_op)
                                           or _constant_symbol(node)):
            found[str(node.target)] = None
    return list(found)


def _as_captured(node: torch.fx.Node, translated: set, is_cia: Any, is_preservable_cia: Any) -> bool:
    """Whether ``node`` translates as captured to what its decomposition would translate to."""
    target = node.target
    if _symbolic(target):
        return True
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    name = f"{target._opname}.{target._overloadname}" if target.namespace == "aten" else ""
    if name in _ASSERTIONS:
        return True
    if target not in translated:
        return False
    if target is torch.ops.aten.to.dtype:  # to its own dtype: one that copies, or a graph output (_alias)
        source = _value(node.args[0])
        return isinstance(source, torch.Tensor) and source.dtype != node.args[1]
    if name == "contiguous.default":  # an identity either way, which the graph optimiser removes
        return True
    if name == "dropout.default":  # in evaluation, likewise
        return node.args[2] is False
    return target in TRANSLATIONS or not is_cia(target) or is_preservable_cia(target)


def _constant_symbol(node: torch.fx.Node) -> bool:
    """Whether ``node``'s output has a size the capture left symbolic though it is a constant (a ``view`` to ``-1``
    with another input's batch size gives one): the second trace makes it a number, and the graph optimiser then
    writes a constant shape where the captured graph would compute one (``_sizes_as_numbers`` does it here)."""
    value = _value(node)
    return isinstance(value, torch.Tensor) and any(_known(dim) is not None for dim in value.shape)


def _known(dim: Any) -> int | None:
    """A size the capture left symbolic though it is a constant, as that number; None for any other size."""
    return dim.node.maybe_as_int() if isinstance(dim, torch.SymInt) else None


def _symbolic(target: Any) -> bool:
    """Arithmetic on symbolic sizes (``operator.mul``, ``torch.sym_not``, ``aten.sym_size``), which the exporter
    translates the same either way."""
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return True
    if target is torch.ops.aten.sym_size.int:
        return True
    return callable(target) and getattr(torch, getattr(target, "__name__", ""), None) is target and \
        target.__name__.startswith("sym_")


def as_the_second_trace_leaves_them(module: torch.fx.GraphModule) -> None:
    """Rewrite what the second trace would rewrite in ``module``'s graph, where it can be done here:

    - an ``aten.flatten.using_ints`` or ``aten.unflatten.int`` that can be a view becomes ``aten.view`` to its
      output's sizes, a symbolic size taken from the first node that computes that symbol (where the second trace
      took it on every graph compared); a flatten whose output has a size no earlier node gives (the batch axis
      flattened into another) is left;
    - an ``aten.to`` that returns its input itself (``_alias``) is removed, its users given its input, unless it is
      one of the graph's outputs;
    - a ``-1`` in an ``aten.reshape``'s shape becomes the size it stands for where that size is a constant (the
      second trace resolves it; the graph optimiser then drops a reshape to the shape its input has);
    - an ``aten.chunk`` along an axis of constant size becomes the ``aten.split.Tensor`` torch's ``chunk`` calls
      (pieces of ``ceil(size / chunks)``);
    - an ``aten.conv2d.padding`` with ``padding="valid"`` (SigLIP's patch embedding) becomes the ``aten.conv2d`` with
      padding 0 it computes;
    - an output size or stride the capture left symbolic though it is a constant is recorded as that number
      (``_sizes_as_numbers``).
    """
    graph, producers = module.graph, {}  # symbol -> the first node that computes it
    for node in list(graph.nodes):
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt):
            producers.setdefault(value.node.expr, node)
        elif node.target is torch.ops.aten.reshape.default and isinstance(value, torch.Tensor):
            shape = [int(dim) if isinstance(given, int) and given == -1 and _static(dim) else given
                     for given, dim in zip(node.args[1], value.shape, strict=True)]
            node.args = (node.args[0], shape)
        elif node.target in _TO and _alias(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in _VIEWS and isinstance(value, torch.Tensor):
            size = [int(dim) if _static(dim) else producers.get(dim.node.expr) for dim in value.shape]
            if any(dim is None for dim in size) or not _viewable(node.args[0], value.shape):
                continue
            with graph.inserting_before(node):
                view = graph.call_function(torch.ops.aten.view.default, (node.args[0], size))
            view.meta = dict(node.meta)
            node.replace_all_uses_with(view)
            graph.erase_node(node)
        elif node.target is torch.ops.aten.chunk.default:
            _chunk_as_split(node)
        elif node.target is torch.ops.aten.conv2d.padding and _argument(node, "padding", "valid") == "valid":
            _valid_as_zero_padding(node)
        if _constant_symbol(node):
            _sizes_as_numbers(node)
    module.recompile()


def _alias(node: torch.fx.Node) -> bool:
    """Whether ``node`` (an ``aten.to``) returns its input itself: the same dtype, device and layout, no copy asked,
    the memory format kept (torch's ``to`` then returns ``self``, and the second trace leaves no node)."""
    source, value = _value(node.args[0]), _value(node)
    if not isinstance(source, torch.Tensor) or not isinstance(value, torch.Tensor) or _is_output(node):
        return False
    same = (source.dtype, source.device, source.layout) == (value.dtype, value.device, value.layout)
    return same and not _argument(node, "copy", False) and \
        _argument(node, "memory_format", None) in (None, torch.preserve_format)


def _is_output(node: torch.fx.Node) -> bool:
    """Whether ``node`` is one of its graph's outputs (the exported program names its outputs by their nodes: such a
    node stays)."""
    return any(user.op == "output" for user in node.users)


def _argument(node: torch.fx.Node, name: str, default: Any) -> Any:
    """The argument ``name`` of ``node``'s op as the node passes it, by position or by keyword (``default`` where
    it is not passed)."""
    for position, argument in enumerate(node.target._schema.arguments):  # type: ignore[union-attr]
        if argument.name == name:
            return node.args[position] if position < len(node.args) else node.kwargs.get(name, default)
    return default


def _chunk_as_split(node: torch.fx.Node) -> None:
    """``chunk(x, chunks, axis)`` as torch's ``chunk`` computes it: ``split(x, ceil(size / chunks), axis)``."""
    source = _value(node.args[0])
    chunks, axis = node.args[1], node.args[2] if len(node.args) > 2 else 0
    if node.kwargs or not isinstance(source, torch.Tensor) or not _static(source.shape[axis]):
        return
    size = int(source.shape[axis])
    if size > 0:  # torch splits an empty axis by sizes instead
        node.target, node.args = torch.ops.aten.split.Tensor, (node.args[0], -(-size // chunks), axis)


def _sizes_as_numbers(node: torch.fx.Node) -> None:
    """Record ``node``'s output with the sizes and strides that are constants as numbers, as the second trace does."""
    value = node.meta["val"]

    def number(dim: Any) -> Any:
        return dim if _known(dim) is None else int(dim)
    with value.fake_mode:
        node.meta["val"] = torch.empty_strided([number(d) for d in value.shape], [number(d) for d in value.stride()],
                                               dtype=value.dtype, device=value.device)


def _valid_as_zero_padding(node: torch.fx.Node) -> None:
    """``conv2d(..., padding="valid")`` as torch's ``conv2d`` computes it: the same convolution with padding 0."""
    position = 4  # padding's, in both overloads' schemas
    if len(node.args) > position:
        node.args = (*node.args[:position], [0, 0], *node.args[position + 1:])
    else:
        node.kwargs = {key: value for key, value in node.kwargs.items() if key != "padding"}
    node.target = torch.ops.aten.conv2d.default


def _viewable(node: Any, shape: torch.Size) -> bool:
    """Whether the tensor ``node`` computes can be viewed as ``shape`` (a flatten of it needs no copy)."""
    value = _value(node)
    try:
        value.view(shape)  # on the capture's fake tensor: computes nothing
    except Exception:  # not viewable, or not a tensor: left to the second trace
        return False
    return True


def _value(node: Any) -> Any:
    """What the capture recorded ``node`` computes (a fake tensor, a symbolic int); None for a constant argument."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _static(dim: int | torch.SymInt) -> bool:
    return isinstance(dim, int) or dim.node.maybe_as_int() is not None


@contextlib.contextmanager
def decompositions_where_needed() -> Iterator[None]:
    """Within the block, torch's exporter decomposes a captured graph only where ``ops_to_decompose`` finds an op
    to decompose. It swaps a module global of torch's exporter: a process exports one graph at a time (no export here
    runs in a thread). The registry must hold ``TRANSLATIONS`` (``exporters.dynamo.translation_table`` does)."""
    try:
        from torch.onnx._internal.exporter import _fx_passes

        decompose = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):
        yield
        return

    def where_needed(program: torch.export.ExportedProgram, registry: Any) -> torch.export.ExportedProgram:
        try:
            as_the_second_trace_leaves_them(program.graph_module)
            needed = ops_to_decompose(program, registry)
        except Exception:  # torch's helpers moved or a rewrite failed (each one done is valid): torch's way
            needed = ["?"]
        return decompose(program, registry) if needed else program

    _fx_passes.decompose_with_registry = where_needed
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose


def check_against_torch(graph: onnx.ModelProto, torch_writes: onnx.ModelProto) -> None:
    """Raise where ``graph`` (exported inside ``decompositions_where_needed``) is not ``torch_writes`` (the same export
    by torch's exporter as it is) node for node, value names aside. With ``TOFU_EXPORT_CHECK_DECOMPOSITIONS=1`` every
    dynamo export makes both and calls this: the check to run the test suite under after torch changes."""
    ours, theirs = graph_structure(graph), graph_structure(torch_writes)
    if ours != theirs:
        at = next((i for i, pair in enumerate(zip(ours, theirs, strict=False)) if pair[0] != pair[1]),
                  min(len(ours), len(theirs)))
        raise RuntimeError(f"the export without torch's second trace is not torch's graph: at node {at} of "
                           f"{len(ours)} / {len(theirs)}, {ours[at:at + 1]} against {theirs[at:at + 1]}")
