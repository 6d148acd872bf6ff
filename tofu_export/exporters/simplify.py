"""Graph simplification: onnxslim (pure-Python wheel, installs on a Jetson's aarch64), onnxsim (optional extra: it
has gone without aarch64 wheels for long stretches, and then compiles on the device), or none.

Either way a failure keeps the unsimplified graph and says why; fused nodes get their module scope back so
profiles and the precision rules (``/blocks.N/reduce/``) still find them.
"""

from __future__ import annotations

import onnx

from tofu_export.names import DEFAULT_SIMPLIFIER, Simplifier

PROTOBUF_LIMIT = 2**31 - 1  # bytes; larger models are saved with external data
WEIGHTS_LIMIT = PROTOBUF_LIMIT - (64 << 20)  # bytes of initializers in one protobuf: 64 MiB left for the rest


def over_protobuf_limit(graph: onnx.ModelProto) -> bool:
    """Whether ``graph`` is too large for one protobuf (2 GB: ViT-H/14 in fp32, a Stable Diffusion UNet). Its size
    is not asked of protobuf, which raises instead of answering past the limit: its initializers' bytes are summed
    (the rest of a graph is small)."""
    weights = sum(len(t.raw_data) or 4 * (len(t.float_data) + len(t.int32_data)) + 8 * len(t.int64_data)
                  for t in graph.graph.initializer)
    return weights > WEIGHTS_LIMIT


def simplify_graph(
    graph: onnx.ModelProto, simplifier: Simplifier = DEFAULT_SIMPLIFIER
) -> tuple[onnx.ModelProto, str | None]:
    """``(graph, note)``: the simplified graph and None, or the input graph and the reason it was kept."""
    if simplifier == "none":
        return graph, None
    if over_protobuf_limit(graph):
        return graph, f"simplification skipped: the model is larger than 2 GB ({simplifier} needs one protobuf)"
    try:
        simplified = _onnxslim(graph) if simplifier == "onnxslim" else _onnxsim(graph)
    except ImportError as error:
        return graph, f"simplification skipped: {simplifier} is not installed ({error}; pip install {simplifier})"
    except Exception as error:  # both raise many kinds; any of them means "keep the original"
        return graph, f"{simplifier} failed and was skipped ({type(error).__name__}: {error})"
    if simplified is None:
        return graph, f"{simplifier} could not validate the simplified graph; the unsimplified graph was kept"
    # a simplifier can fuse ops (ReduceMax + Unsqueeze -> ReduceMax keepdims=1) and keep stale shape annotations
    del simplified.graph.value_info[:]
    restore_scope_names(graph, simplified)
    return onnx.shape_inference.infer_shapes(simplified, strict_mode=True), None


def _onnxslim(graph: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(graph)


def _onnxsim(graph: onnx.ModelProto) -> onnx.ModelProto | None:
    import onnxsim

    simplified, ok = onnxsim.simplify(graph)
    return simplified if ok else None


def restore_scope_names(original: onnx.ModelProto, simplified: onnx.ModelProto) -> None:
    """Give fused nodes (onnxsim names its MatMul+Add -> Gemm fusions ``Gemm_3``) the module scope of the node whose
    weight or input they took over, e.g. ``/blocks/blocks.0/mlp/fc2/Gemm``, so profiles can attribute their time."""
    weights = {init.name for init in original.graph.initializer}
    scope_of = {
        name: node.name.rsplit("/", 1)[0]
        for node in original.graph.node
        if node.name.startswith("/")
        for name in node.input
        if name in weights
    }
    taken = {node.name for node in simplified.graph.node}
    for node in simplified.graph.node:
        scope = next((scope_of[name] for name in node.input if name in scope_of), None)
        if node.name.startswith("/") or scope is None:
            continue
        name, k = f"{scope}/{node.op_type}", 1
        while name in taken:
            name, k = f"{scope}/{node.op_type}_{k}", k + 1
        taken.add(name)
        node.name = name
