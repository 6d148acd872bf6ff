"""Which attention layers of a built engine became fused multi-head-attention kernels, from TensorRT's engine
inspector (``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``).

The inspector lists the engine's layers after fusion. With ``ProfilingVerbosity.DETAILED`` (``build_engine`` sets it)
each layer is an object with ``Name``, ``LayerType`` and ``TacticName``; with ``LAYER_NAMES_ONLY`` it is a name. A
block's attention counts as *fused MHA* when one of its layers is an MHA kernel (a layer type or tactic naming
``mha``/``fmha``), as *one region* when a single Myelin ("ForeignNode") layer covers both attention MatMuls and the
Softmax, and as *unfused* otherwise.

Whether ToFu's proportional attention (an additive ``log(size)`` bias on the scores before the Softmax) keeps the
fusion is not known here: no TensorRT build was possible on this machine. TensorRT's fused MHA accepts an additive
mask/bias in some releases; this report says, per block, what a real engine did.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

Fusion = Literal["fused_mha", "one_region", "unfused"]
# a block's attention scope: timm's ``blocks.3/attn/``, transformers' ``layer.3/attention/`` (ViT, DINOv2, DINOv3) and
# ``layers.3/self_attn/`` (CLIP, SigLIP), open_clip's ``resblocks.3/attn/``
_ATTENTION = r"/(?:attn|attention|self_attn)/"
_BLOCK = re.compile(r"(?:^|[/\[])[A-Za-z_][\w.]*?\.(\d+)" + _ATTENTION)
_SCORES = re.compile(_ATTENTION + "MatMul")  # q @ k^T and @ v, directly in the attention's scope
_MHA = re.compile(r"(?<![a-z])f?mha|multihead|_mha_", re.IGNORECASE)


@dataclass(frozen=True)
class AttentionFusion:
    """What TensorRT made of one block's attention: the fusion verdict and the engine layers that cover it."""

    block: int
    fusion: Fusion
    layers: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_layers(information: str | dict[str, Any]) -> list[dict[str, str]]:
    """The inspector's JSON (a string or parsed) as ``[{"name", "type", "tactic"}]``, in engine order."""
    data = json.loads(information) if isinstance(information, str) else information
    layers = []
    for layer in data.get("Layers", []):
        if isinstance(layer, str):  # LAYER_NAMES_ONLY
            layers.append({"name": layer, "type": "", "tactic": ""})
        else:
            layers.append({"name": str(layer.get("Name", "")), "type": str(layer.get("LayerType", "")),
                           "tactic": str(layer.get("TacticName", ""))})  # fmt: skip
    return layers


def _verdict(layers: list[dict[str, str]]) -> Fusion:
    if any(_MHA.search(f"{layer['type']} {layer['tactic']}") or _MHA.search(layer["name"]) for layer in layers):
        return "fused_mha"
    for layer in layers:  # one Myelin region over q @ k^T, Softmax and @ v
        name = layer["name"]
        one_region = "ForeignNode" in name and len(_SCORES.findall(name)) >= 2
        if one_region or ("Softmax" in name and "MatMul" in name):
            return "one_region"
    return "unfused"


def attention_fusion(information: str | dict[str, Any]) -> list[AttentionFusion]:
    """Per transformer block (its attention scope in a layer name: ``blocks.N/attn/``, ``layer.N/attention/``...),
    whether its attention became a fused MHA kernel."""
    by_block: dict[int, list[dict[str, str]]] = {}
    for layer in parse_layers(information):
        for block in sorted({int(match) for match in _BLOCK.findall(layer["name"])}):
            by_block.setdefault(block, []).append(layer)
    return [AttentionFusion(block, _verdict(layers), [layer["name"] for layer in layers])
            for block, layers in sorted(by_block.items())]  # fmt: skip


def engine_information(engine: Any, trt: Any) -> str:
    """The inspector's JSON for a deserialized ``ICudaEngine`` (TensorRT >= 8.2)."""
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
