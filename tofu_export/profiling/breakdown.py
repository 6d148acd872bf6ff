"""Attribute per-op times to ViT parts (attention, MLP, token reduction, ...) from scoped node names."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tofu_export.engines.base import OpTime

CATEGORIES = ("attention", "mlp", "token_reduction", "embed", "head", "other")
_SCOPE_CATEGORY = {
    "attn": "attention",
    "attention": "attention",
    "mlp": "mlp",
    "patch_embed": "embed",
    "pos_embed": "embed",
    "pos_drop": "embed",
    "patch_drop": "embed",
    "norm_pre": "embed",
    "head": "head",
    "head_drop": "head",
    "fc_norm": "head",
    "attn_pool": "head",
    "self_attn": "attention",  # transformers' CLIP and SigLIP layers
}
# A model's own top-level modules (under transformers' wrapper: ``hf.<name>``): open_clip's ``conv1`` / ``ln_pre`` /
# ``ln_post``, transformers' ``embeddings`` / ``layernorm`` / ``post_layernorm`` / ``pooler``; timm's final ``norm``.
_TOP_LEVEL_CATEGORY = {
    "conv1": "embed",
    "ln_pre": "embed",
    "embeddings": "embed",
    "pre_layrnorm": "embed",  # transformers' CLIP spells it so
    "norm": "head",
    "layernorm": "head",
    "post_layernorm": "head",
    "ln_post": "head",
    "pooler": "head",
}
_WRAPPER = "hf"  # the transformers model inside ``HFVisionEncoder``
# Fused ORT/TensorRT kernels that lose their scope in the rename but only occur in one ViT part.
_UNSCOPED_OP_CATEGORY = {
    "BiasGelu": "mlp",
    "FastGelu": "mlp",
    "Gelu": "mlp",
    "QuickGelu": "mlp",
    "Attention": "attention",
    "MultiHeadAttention": "attention",
}
_SEPARATORS = re.compile(r"[/.\s\[\],+{}]+")


def categorize(node_name: str, op_type: str = "") -> str:
    """Category of one node from its module scope.

    Handles ONNX names from the TorchScript exporter (``/blocks.3/attn/qkv/MatMul``), torch module paths
    (``blocks.3.attn``) and fused TensorRT layer names (``/blocks.3/mlp/fc1/MatMul + /blocks.3/mlp/act/...``).
    A ``reduce`` scope (the ToFu merge submodule inside each block) wins over everything; then a model's top-level
    module (the final ``norm`` counts as ``head``, open_clip's ``conv1`` as ``embed``); otherwise the first
    recognised scope decides (timm's, transformers' and open_clip's names). Unscoped fused kernels
    fall back to ``op_type`` (``BiasGelu`` -> ``mlp``, ``MultiHeadAttention`` -> ``attention``); anything
    else (residual adds, layout transposes, the cls-token concat) is ``other``.
    """
    tokens = [token for token in _SEPARATORS.split(node_name) if token]
    if "reduce" in tokens:
        return "token_reduction"
    top = tokens[1:2] if tokens[:1] == [_WRAPPER] else tokens[:1]
    if top and top[0] in _TOP_LEVEL_CATEGORY:
        return _TOP_LEVEL_CATEGORY[top[0]]
    for token in tokens:
        if token in _SCOPE_CATEGORY:
            return _SCOPE_CATEGORY[token]
    return _UNSCOPED_OP_CATEGORY.get(op_type, "other")


@dataclass(frozen=True)
class Breakdown:
    """Per-category milliseconds per run (every category present, possibly 0.0) and the slowest ops."""

    by_category_ms: dict[str, float]
    total_ms: float
    top_ops: list[OpTime] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_category_ms": dict(self.by_category_ms),
            "total_ms": self.total_ms,
            "top_ops": [{**op.to_dict(), "category": categorize(op.name, op.op_type)} for op in self.top_ops],
        }


def summarize(op_times: Iterable[OpTime], *, top_n: int = 10) -> Breakdown:
    """Sum op times per category and keep the ``top_n`` slowest ops (descending)."""
    ops = list(op_times)
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for op in ops:
        by_category[categorize(op.name, op.op_type)] += op.ms
    top = sorted(ops, key=lambda op: op.ms, reverse=True)[:top_n]
    return Breakdown(by_category_ms=by_category, total_ms=sum(by_category.values()), top_ops=top)
