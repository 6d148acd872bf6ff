"""What token reduction adds to every block of an exported graph, counted from the ONNX file alone.

On a GPU at batch 1 each node that is not fused is a kernel launch, so the nodes the reduction adds per block are
the risk that its speed-up vanishes there. TensorRT fuses chains of pointwise ops into one kernel, and shape-only
ops (``Reshape``, ``Squeeze``...) usually cost none; everything else (TopK, gathers, matmuls, reductions, slices,
concats) is typically one kernel each. ``reduction_costs`` splits a block's reduction nodes that way. A square
``Mul(x, x)`` that only feeds a ``ReduceSum``, and the ``Sqrt`` of that sum, count with the sum: they are the layers
TensorRT's ONNX importer itself writes for a ``ReduceL2`` (square, sum, square root), which counts as one.

A node belongs to block ``i``'s reduction when its name has the module scope of block ``i``'s ``reduce`` module
(``blocks.i/reduce`` in timm, ``layer.i/reduce`` in transformers; both exporters name nodes so). In a denoiser, a
reduction is dense ToFu around one sub-layer (``.../transformer_blocks.0/attn1/tofu``: its matching, merge and
unmerge, not the sub-layer it runs in ``tofu/sublayer``), named by the sub-layer's path. Nodes a simplifier renamed
without a scope are given the scope of their consumers when those all share one. Proportional attention's mask (a
``Log``, a ``Reshape`` and the attention's ``Add``) lives outside the ``reduce`` scope and is not counted.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

# Elementwise ops that TensorRT's pointwise fusion merges (a connected chain of them becomes one kernel).
POINTWISE_OPS = frozenset({
    "Abs", "Add", "And", "Cast", "CastLike", "Ceil", "Clip", "Div", "Equal", "Erf", "Exp", "Floor", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Log", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow", "Reciprocal",
    "Relu", "Sigmoid", "Sign", "Sqrt", "Sub", "Tanh", "Where", "Xor",
})  # fmt: skip
# Ops that only relabel a tensor's shape (no kernel for a contiguous tensor) or are build-time constants.
SHAPE_OPS = frozenset({"Constant", "Flatten", "Identity", "Reshape", "Shape", "Squeeze", "Unsqueeze"})
# a block's ``reduce`` module: timm's ``blocks.3/reduce``, transformers' ``layer.3/reduce``, open_clip's
# ``resblocks.3/reduce`` (the block list's name, a dot, the block index)
_REDUCE_SCOPE = re.compile(r"(?:^|/)[A-Za-z_][\w.]*\.(\d+)/reduce(?:/|$)")
_DENSE_SCOPE = "/tofu"  # a denoiser sub-layer's ``dense.module.DenseToFu`` (the sub-layer itself: ``tofu/sublayer``)


@dataclass(frozen=True)
class BlockCost:
    """The reduction's nodes in one block, by kind. ``kernels`` estimates TensorRT launches: every ``other`` node
    plus one per connected chain of pointwise nodes. ``block``: a ViT block's index, or a denoiser sub-layer's path."""

    block: int | str
    nodes: int
    pointwise: int
    shape: int
    other: int
    kernels: int
    ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReductionCosts:
    """Per-block reduction costs of one graph, and the graph's node count."""

    blocks: list[BlockCost]
    graph_nodes: int

    @property
    def total(self) -> BlockCost:
        ops: Counter[str] = Counter()
        for block in self.blocks:
            ops.update(block.ops)
        sums = [sum(getattr(b, name) for b in self.blocks) for name in ("nodes", "pointwise", "shape", "other")]
        return BlockCost(-1, *sums, sum(b.kernels for b in self.blocks), dict(ops.most_common()))

    def to_dict(self) -> dict:
        return {"graph_nodes": self.graph_nodes, "blocks": [asdict(b) for b in self.blocks],
                "total": asdict(self.total)}

    def render(self) -> str:
        """A table a person can read: one row per reducing block, then the total."""
        if not self.blocks:
            return "no token reduction found (no <blocks>.N/reduce or <sub-layer>/tofu scope in the node names)"
        labels = [str(b.block) for b in self.blocks] + ["total"]
        width = max(5, *map(len, labels))
        lines = [f"token reduction: {self.total.nodes} of {self.graph_nodes} nodes in {len(self.blocks)} blocks",
                 f"{'block':>{width}}  nodes  pointwise  shape  other  est. kernels  other ops"]
        for label, b in zip(labels, [*self.blocks, self.total], strict=True):
            other_ops = ", ".join(f"{op} {n}" for op, n in b.ops.items() if op not in POINTWISE_OPS | SHAPE_OPS)
            lines.append(f"{label:>{width}}  {b.nodes:>5}  {b.pointwise:>9}  {b.shape:>5}  {b.other:>5}  "
                         f"{b.kernels:>12}  {other_ops}")
        return "\n".join(lines)


def reduction_costs(model: onnx.ModelProto | str | Path) -> ReductionCosts:
    """Count, per block, the nodes of its token reduction (see the module docstring); blocks without any are
    left out."""
    graph = (onnx.load(str(model), load_external_data=False) if isinstance(model, str | Path) else model).graph
    block_of = _reduction_blocks(graph)
    by_block: dict[int | str, list[onnx.NodeProto]] = {}  # ViT blocks by index, denoiser sub-layers in graph order
    for position, node in enumerate(graph.node):
        if position in block_of:
            by_block.setdefault(block_of[position], []).append(node)
    order = sorted(by_block, key=lambda block: block if isinstance(block, int) else -1)  # stable: paths keep order
    return ReductionCosts([_block_cost(block, by_block[block]) for block in order], len(graph.node))


def _reduction_of(name: str) -> int | str | None:
    """The reduction a node named ``name`` belongs to: a ViT block's index, a denoiser sub-layer's path, or None."""
    match = _REDUCE_SCOPE.search(name)
    if match:
        return int(match.group(1))
    scope = name.rsplit("/", 1)[0]
    return scope[: -len(_DENSE_SCOPE)].strip("/") if scope.endswith(_DENSE_SCOPE) else None


def _reduction_blocks(graph: onnx.GraphProto) -> dict[int, int | str]:
    """Node position -> block for reduction nodes; unscoped nodes inherit their consumers' common scope."""
    scope: dict[int, int | str | None] = {}  # the node's block, "" for another named scope, None for no scope
    for position, node in enumerate(graph.node):
        block = _reduction_of(node.name)
        scope[position] = block if block is not None else ("" if node.name.startswith("/") else None)
    consumers: dict[str, list[int]] = {}
    for position, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(position)
    for position in reversed(range(len(graph.node))):  # consumers come later in a topologically sorted graph
        if scope[position] is None:
            users = {scope[user] for output in graph.node[position].output for user in consumers.get(output, [])}
            if len(users) == 1:
                scope[position] = users.pop()
    return {position: block for position, block in scope.items() if block is not None and block != ""}


def _block_cost(block: int | str, nodes: list[onnx.NodeProto]) -> BlockCost:
    ops = Counter(node.op_type for node in nodes)
    pointwise = sum(n for op, n in ops.items() if op in POINTWISE_OPS)
    shape = sum(n for op, n in ops.items() if op in SHAPE_OPS)
    other = len(nodes) - pointwise - shape
    written_out = _reduce_l2_written_out(nodes)
    chains = _pointwise_chains([node for node in nodes if id(node) not in written_out])
    return BlockCost(block, len(nodes), pointwise, shape, other, other + chains, dict(ops.most_common()))


def _reduce_l2_written_out(nodes: list[onnx.NodeProto]) -> set[int]:
    """``id``s of the pointwise halves of ``Sqrt(ReduceSum(Mul(x, x)))``: the square whose every consumer is a
    ``ReduceSum``, and a ``Sqrt`` that is such a sum's only consumer (see the module docstring)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name: str, op_type: str) -> list[onnx.NodeProto]:
        users = consumers.get(name, [])
        return users if users and all(user.op_type == op_type for user in users) else []

    found: set[int] = set()
    for node in nodes:
        if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
            sums = only(node.output[0], "ReduceSum")
            if sums:
                found.add(id(node))
                roots = [only(total.output[0], "Sqrt") for total in sums]
                found.update(id(users[0]) for users in roots if len(users) == 1)
    return found


def _pointwise_chains(nodes: list[onnx.NodeProto]) -> int:
    """Connected components of the pointwise nodes (edges: one's output feeds another's input)."""
    pointwise = [node for node in nodes if node.op_type in POINTWISE_OPS]
    parent = list(range(len(pointwise)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {output: i for i, node in enumerate(pointwise) for output in node.output}
    for i, node in enumerate(pointwise):
        for name in node.input:
            if name in producer:
                parent[root(i)] = root(producer[name])
    return len({root(i) for i in range(len(pointwise))})
