"""What a timm checkpoint states about its architecture, and what it cannot state.

The weights fix most of a ViT (widths, depth, patch, tokens), but not two things:

* **the head count**: ``qkv`` is ``[3C, C]`` for any number of heads. It comes, in this order, from ``num_heads``
  given by the caller, the per-head width of qk-norm weights (``q_norm.weight [C / H]``), a timm config beside the
  checkpoint (``config.json`` with ``architecture``/``model_args``, or the ``<name>.json`` sidecar this project's
  converters write), or the timm width table (every timm ViT of one width has one head count); a width outside the
  table is refused until the caller says it;
* **the block kind**: a res-post-norm ``ResPostBlock`` has exactly a pre-norm ``Block``'s keys. Their *order* tells
  them apart where the file kept the registration order (pickles; ``weight`` before ``bias`` shows it): ``norm1``
  after ``attn`` is res-post-norm. A config beside the checkpoint names the block through its architecture.

Parallel blocks and integer (quantized) weights are refused from the keys and dtypes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint

__all__ = ["Evidence", "check_block_kind", "check_float_weights", "head_count", "read_evidence"]

# embed_dim -> (num_heads, a timm model of that width): every timm VisionTransformer of the width uses the count
WIDTH_HEADS: dict[int, tuple[int, str]] = {
    192: (3, "vit_tiny_patch16_224"), 384: (6, "vit_small_patch16_224"), 512: (8, "vit_medium_patch16_gap_256"),
    640: (10, "vit_betwixt_patch16_reg4_gap_256"), 768: (12, "vit_base_patch16_224"),
    1024: (16, "vit_large_patch16_224"), 1152: (16, "vit_so400m_patch14_siglip_224"),
    1280: (16, "vit_huge_patch14_224"), 1408: (16, "vit_giant_patch14_224"), 1536: (24, "vit_giant_patch14_dinov2"),
    1664: (16, "vit_gigantic_patch14_224"),
}
_PARALLEL_MARKERS = ("attns.", "ffns.", "in_proj.", "in_norm.")


@dataclass(frozen=True)
class Evidence:
    """A timm config found beside a checkpoint: where, the architecture it names and its model kwargs."""

    source: str = ""
    architecture: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)


def read_evidence(path: Path) -> Evidence:
    """The timm config beside ``path``: ``<stem>.json`` (a converter's sidecar) or ``config.json`` (hub layout)."""
    for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
        if candidate == path or not candidate.is_file():
            continue
        try:
            data = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        args = data.get("model_args") or data.get("timm_kwargs") or {}
        name = data.get("architecture")
        if isinstance(name, str) or (isinstance(args, dict) and args):
            return Evidence(candidate.name, name if isinstance(name, str) else None, dict(args or {}))
    return Evidence()


def _named_model(name: str) -> torch.nn.Module | None:
    """The timm model ``name`` built on the meta device (no memory, no weights), or None if timm has no such name."""
    import timm

    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def check_float_weights(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Integer tensors (int8/uint8 quantized exports) are refused: ToFu exports float models."""
    integer = [f"{k} ({v.dtype})" for k, v in state_dict.items()
               if not (v.is_floating_point() or v.dtype == torch.bool)]
    if integer:
        raise CheckpointError(
            f"the checkpoint holds integer (quantized) weights: {', '.join(integer[:3])}"
            f"{' ...' if len(integer) > 3 else ''}; tofu-export exports float models: use the float checkpoint "
            "(quantize the exported ONNX / TensorRT engine instead)"
        )


def check_block_kind(state_dict: Mapping[str, torch.Tensor], evidence: Evidence) -> str:
    """Refuse parallel and res-post-norm blocks; return how the pre-norm block kind is known."""
    block0 = [k.split(".", 2)[2] for k in state_dict if k.startswith("blocks.0.")]
    if any(key.startswith(_PARALLEL_MARKERS) for key in block0):
        raise CheckpointError("the checkpoint's blocks are parallel blocks (attention and MLP side by side: "
                              "ParallelScalingBlock / ParallelThingsBlock); ToFu patches sequential pre-norm blocks")
    if evidence.architecture:
        model = _named_model(evidence.architecture)
        if model is not None:
            kind = type(model.blocks[0]).__name__ if hasattr(model, "blocks") else type(model).__name__
            if kind != "Block":
                raise CheckpointError(f"{evidence.source} names {evidence.architecture}, whose blocks are {kind}; "
                                      "ToFu patches timm's pre-norm Block only (res-post-norm and parallel blocks "
                                      "are not implemented)")
            return f"pre-norm Block ({evidence.source} names {evidence.architecture})"
    order = {key: i for i, key in enumerate(block0)}
    registration = order.get("norm1.weight", 0) < order.get("norm1.bias", -1)  # unsorted: module order kept
    if registration and "norm1.weight" in order and "attn.qkv.weight" in order:
        if order["attn.qkv.weight"] < order["norm1.weight"]:
            raise CheckpointError("the checkpoint's blocks are res-post-norm (timm ResPostBlock: norm1 is stored after "
                                  "attn, x + norm1(attn(x))); ToFu patches pre-norm blocks only")
        return "pre-norm Block (key order: norm1 before attn)"
    return "pre-norm Block (keys sorted: the layout cannot show res-post-norm; no config beside the checkpoint)"


def head_count(state_dict: Mapping[str, torch.Tensor], embed_dim: int, evidence: Evidence,
               num_heads: int | None) -> tuple[int, str]:
    """The head count and where it came from (see the module docstring); refuses when nothing states it."""
    if num_heads is not None:
        if num_heads < 1 or embed_dim % num_heads:
            raise CheckpointError(f"num_heads={num_heads} does not divide the embedding width {embed_dim}",
                                  hint=Hint("num_heads", str(WIDTH_HEADS.get(embed_dim, (1,))[0])))
        return num_heads, "given"
    q_norm = state_dict.get("blocks.0.attn.q_norm.weight")
    if q_norm is not None and q_norm.ndim == 1 and embed_dim % int(q_norm.shape[0]) == 0:
        return embed_dim // int(q_norm.shape[0]), "weights (qk-norm width per head)"
    if isinstance(evidence.model_args.get("num_heads"), int):
        return int(evidence.model_args["num_heads"]), f"{evidence.source} model_args"
    model = _named_model(evidence.architecture) if evidence.architecture else None
    if model is not None and hasattr(model, "blocks") and int(model.embed_dim) == embed_dim:
        return int(model.blocks[0].attn.num_heads), f"{evidence.source} architecture {evidence.architecture}"
    if embed_dim in WIDTH_HEADS:
        heads, example = WIDTH_HEADS[embed_dim]
        return heads, f"timm width table (every timm ViT {embed_dim} wide, e.g. {example}, has {heads} heads)"
    raise CheckpointError(
        f"the head count of this {embed_dim}-wide ViT is not in its weights, no config beside it states it, and no "
        "timm ViT has this width; say it",
        hint=Hint("num_heads", None, "the model's attention heads (or give the exact timm architecture name)"),
    )
