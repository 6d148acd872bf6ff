"""What states a timm checkpoint's architecture where its weights cannot, or a refusal.

The weights fix most of a ViT (widths, depth, patch, tokens), but not two things, and the parity gate cannot check
a wrong guess of either (it compares the ONNX graph with the same wrongly built model):

* **the head count**: ``qkv`` is ``[3C, C]`` for any number of heads;
* **the block kind**: a res-post-norm ``ResPostBlock`` (``x + norm1(attn(x))``) has exactly a pre-norm ``Block``'s
  keys and shapes.

Each is taken from a statement, never from a guess. In order:

1. the caller: ``num_heads`` asserts *a timm VisionTransformer of plain pre-norm ``Block``s with that many heads*
   (every other value still comes from the weights); a timm ``arch`` name states both (its ``Block`` class and
   head count);
2. the weights: the per-head width of qk-norm weights (``q_norm.weight [C / H]``) gives the head count; layer-scale
   weights (``ls1.gamma``, which ``ResPostBlock`` lacks) and, in a pickle, the registration order of the keys
   (``norm1`` before ``attn``; ``weight`` before ``bias`` shows the order was kept) give the block kind;
3. the checkpoint's own record (timm ``train.py`` saves ``arch`` = ``args.model`` and ``args.model_kwargs``), then
   a ``<stem>.json`` sidecar (this project's converters), then ``config.json`` beside it (timm's hub layout:
   ``architecture`` and ``model_args`` at the top level; ``pretrained_cfg`` holds preprocessing only). A named
   architecture states its block class and head count (``model_args`` may override the count); ``model_args``
   without a name describe ``VisionTransformer(**model_args)``, whose default block is the pre-norm ``Block``.

Where the head count or the block kind is still unstated, the checkpoint is refused with the two ways in (a timm
name, or ``num_heads``). Parallel blocks, res-post-norm blocks and integer (quantized) weights are refused.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint
from tofu_export.models.tuned import is_tuned_statement

__all__ = ["Evidence", "Statement", "check_float_weights", "check_sequential_blocks", "read_evidence",
           "state_architecture"]

# embed_dim -> (num_heads, a timm model of that width): only to suggest a name when nothing states the heads
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
    """A statement found beside (or in) a checkpoint: where, the timm architecture it names and its model kwargs."""

    source: str = ""
    architecture: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    built: bool = False  # the named architecture is the model built (the caller's arch): loading checks its shapes
    checkpoint: str = ""  # the checkpoint's file name, for messages
    preprocessing: dict[str, Any] = field(default_factory=dict)  # config.json's pretrained_cfg: mean, std, crop, ...
    args_source: str = "model_args"  # where in ``source`` the model kwargs are stated, for provenance
    tuned: dict[str, Any] = field(default_factory=dict)  # the whole sidecar where `tofu-export finetune` wrote it
    # (the reduction the weights were tuned for, the checkpoint they were tuned from), {} for any other file


@dataclass(frozen=True)
class Statement:
    """The head count and block kind of a checkpoint, each with where it was stated."""

    num_heads: int
    heads_source: str
    block_source: str

    @property
    def summary(self) -> str:
        """``<heads source>, <block source>``, the block's said once where one statement gave both."""
        named = self.block_source.startswith("pre-norm Block (") and " names " in self.block_source
        if named and self.heads_source.startswith(self.block_source[len("pre-norm Block ("):].split(" names ")[0]):
            return f"{self.heads_source} (pre-norm Block)"
        return f"{self.heads_source}, {self.block_source}"


def read_evidence(path: Path, record: Mapping[str, Any] | None = None) -> Evidence:
    """The checkpoint's own ``record`` (``checkpoint_wrappers.training_record``) where it names a timm model or states
    its model kwargs (a pickled model's head count), else the
    timm config beside ``path``: ``<stem>.json`` (a converter's or ``clean-checkpoint``'s sidecar) or ``config.json``
    (hub layout); an empty ``Evidence`` when none."""
    name, args = (record or {}).get("architecture"), (record or {}).get("model_args") or {}
    if (isinstance(name, str) and named_timm_model(name) is not None) or (name is None and args):
        stated_by = record.get("stated_by", "timm training record (arch, args.model_kwargs)")
        return Evidence(f"{path.name}'s {stated_by}", name, dict(args), checkpoint=path.name,
                        preprocessing=stated_preprocessing(record.get("pretrained_cfg")),
                        args_source=record.get("args_source", "model_args"))
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
            return Evidence(candidate.name, name if isinstance(name, str) else None,
                            dict(args) if isinstance(args, dict) else {}, checkpoint=path.name,
                            preprocessing=stated_preprocessing(data.get("pretrained_cfg")),
                            tuned=data if is_tuned_statement(data) else {})
    return Evidence(checkpoint=path.name)


def stated_preprocessing(pretrained_cfg: Any) -> dict[str, Any]:
    """The input preprocessing a timm config states (``pretrained_cfg``: mean, std, interpolation, crop_pct,
    crop_mode), its well-formed values only: what the model's eval transform (quick look, calibration, ``eval``)
    normalises with, where the architecture's defaults may not (a ViT's are 0.5, a DeiT's ImageNet's)."""
    if not isinstance(pretrained_cfg, dict):
        return {}
    stated: dict[str, Any] = {}
    for key in ("mean", "std"):
        value = pretrained_cfg.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value) and (
                key == "mean" or all(v > 0 for v in value)):
            stated[key] = tuple(float(v) for v in value)
    for key in ("interpolation", "crop_mode"):
        if isinstance(pretrained_cfg.get(key), str):
            stated[key] = pretrained_cfg[key]
    crop = pretrained_cfg.get("crop_pct")
    if isinstance(crop, (int, float)) and 0 < crop <= 1:
        stated["crop_pct"] = float(crop)
    return stated


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


def state_architecture(state_dict: Mapping[str, torch.Tensor], embed_dim: int, evidence: Evidence,
                       num_heads: int | None, suggestion: str | None = None) -> Statement:
    """The head count and block kind of ``state_dict`` (``[C]``-wide blocks) from what states them (see the module
    docstring); refuses unimplemented blocks, statements that contradict the weights, and what nothing states.
    ``suggestion``: a timm name of this shape, for the refusal's hint."""
    check_sequential_blocks(state_dict)
    block0 = [k.split(".", 2)[2] for k in state_dict if k.startswith("blocks.0.")]
    named_heads = _named_heads(evidence, embed_dim)  # refuses a named non-Block architecture or another width
    block = _block_source(block0, evidence, num_heads)
    heads = _heads(state_dict, embed_dim, evidence, num_heads, named_heads)
    if block is None or heads is None:
        raise _unstated(embed_dim, evidence, heads is None, block is None, suggestion)
    return Statement(heads[0], heads[1], block)


def check_sequential_blocks(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Parallel blocks (their own key names) are refused: ToFu patches sequential blocks."""
    if any(k.startswith("blocks.0.") and k.split(".", 2)[2].startswith(_PARALLEL_MARKERS) for k in state_dict):
        raise CheckpointError("the checkpoint's blocks are parallel blocks (attention and MLP side by side: "
                              "ParallelScalingBlock / ParallelThingsBlock); ToFu patches sequential pre-norm blocks")


@functools.lru_cache(maxsize=8)
def named_timm_model(name: str) -> torch.nn.Module | None:
    """The timm model ``name`` built on the meta device (no memory, no weights), or None if timm has no such name.
    Read for its structure only: a ViT skips its weight initialisation (~0.07 -> ~0.01 CPU-s for deit_tiny)."""
    import timm

    if not timm.is_model(name):
        return None
    with torch.device("meta"):
        try:
            return timm.create_model(name, pretrained=False, weight_init="skip")
        except TypeError:  # a model class without timm ViT's weight_init argument
            return timm.create_model(name, pretrained=False)


def _named_heads(evidence: Evidence, embed_dim: int) -> int | None:
    """The head count a named architecture (with its ``model_args``) states; refuses a named architecture whose
    blocks are not timm's pre-norm ``Block``, or whose width is not the checkpoint's (it describes other weights)."""
    from timm.models.vision_transformer import Block, VisionTransformer

    args = evidence.model_args
    model = named_timm_model(evidence.architecture) if evidence.architecture else None
    if model is not None:
        vit = isinstance(model, VisionTransformer) and len(model.blocks) > 0
        kind = type(model.blocks[0]).__name__ if vit else type(model).__name__
        if not vit or type(model.blocks[0]) is not Block:
            raise CheckpointError(f"{evidence.source} names {evidence.architecture}, whose blocks are {kind}; "
                                  "ToFu patches timm's pre-norm Block only (res-post-norm and parallel blocks "
                                  "are not implemented)")
    elif "block_fn" in args:
        raise CheckpointError(f"{evidence.source} model_args set block_fn={args['block_fn']!r}; ToFu patches timm's "
                              "pre-norm Block only")
    width = args.get("embed_dim", None if model is None else int(model.embed_dim))
    if evidence.built and model is not None:  # built as named: a width mismatch is reported key by key on loading
        return int(model.blocks[0].attn.num_heads)
    if width is not None and width != embed_dim:
        described = evidence.architecture or "its model_args"
        raise CheckpointError(f"{evidence.source} describes a {width}-wide model ({described}), but the checkpoint "
                              f"is {embed_dim} wide: it is not this checkpoint's "
                              "config; move it away or state the architecture",
                              hint=Hint("arch", None, "with the checkpoint's timm architecture name"))
    heads = args.get("num_heads", None if model is None else int(model.blocks[0].attn.num_heads))
    if heads is not None and not (isinstance(heads, int) and heads > 0 and embed_dim % heads == 0):
        raise CheckpointError(f"{evidence.source} states num_heads={heads!r}, which does not divide the checkpoint's "
                              f"width {embed_dim}")
    return heads


def _block_source(block0: list[str], evidence: Evidence, num_heads: int | None) -> str | None:
    """Where the pre-norm block kind is stated, or None; refuses res-post-norm blocks the key order shows."""
    order = {key: i for i, key in enumerate(block0)}
    registration = order.get("norm1.weight", 0) < order.get("norm1.bias", -1)  # unsorted: module order kept
    if registration and "norm1.weight" in order and "attn.qkv.weight" in order:
        if order["attn.qkv.weight"] < order["norm1.weight"]:
            raise CheckpointError("the checkpoint's blocks are res-post-norm (timm ResPostBlock: norm1 is stored after "
                                  "attn, x + norm1(attn(x))); ToFu patches pre-norm blocks only")
        return "pre-norm Block (key order: norm1 before attn)"
    if evidence.architecture and named_timm_model(evidence.architecture) is not None:
        return f"pre-norm Block ({evidence.source} names {evidence.architecture})"
    if evidence.model_args and not evidence.architecture:
        return f"pre-norm Block ({evidence.source} model_args: VisionTransformer's default block)"
    if "ls1.gamma" in order:
        return "pre-norm Block (weights: layer scale ls1.gamma, which res-post-norm blocks lack)"
    if num_heads is not None:
        return ("pre-norm Block (asserted by the given num_heads; the sorted keys cannot show the block kind, "
                "nothing beside the checkpoint states it)")
    return None


def _heads(state_dict: Mapping[str, torch.Tensor], embed_dim: int, evidence: Evidence, num_heads: int | None,
           named_heads: int | None) -> tuple[int, str] | None:
    """The head count and where it was stated, or None."""
    if num_heads is not None:
        if num_heads < 1 or embed_dim % num_heads:
            raise CheckpointError(f"num_heads={num_heads} does not divide the embedding width {embed_dim}",
                                  hint=Hint("num_heads", str(WIDTH_HEADS.get(embed_dim, (1,))[0])))
        return num_heads, "given"
    q_norm = state_dict.get("blocks.0.attn.q_norm.weight")
    if q_norm is not None and q_norm.ndim == 1 and int(q_norm.shape[0]) and embed_dim % int(q_norm.shape[0]) == 0:
        return embed_dim // int(q_norm.shape[0]), "weights (qk-norm width per head)"
    if named_heads is None:
        return None
    if "num_heads" in evidence.model_args:
        return named_heads, f"{evidence.source} {evidence.args_source}"
    return named_heads, f"{evidence.source}: {evidence.architecture}"


def _unstated(embed_dim: int, evidence: Evidence, heads: bool, block: bool, suggestion: str | None) -> CheckpointError:
    """The refusal: what is missing, what was looked at, and the two ways in (a timm name, or the head count)."""
    missing = [what for what, lacking in (
        ("its head count (qkv is [3C, C] for any number of heads)", heads),
        ("its block kind (sorted keys look the same for pre-norm and res-post-norm blocks)", block)) if lacking]
    looked = ("nothing else states them (no timm training record in the file, no <name>.json sidecar or "
              "config.json naming a timm architecture)")
    if evidence.architecture:
        looked = f"{evidence.source} names {evidence.architecture}, which this timm does not know"
    heads_hint = Hint("num_heads", "N", "for a timm ViT of plain pre-norm Blocks with N heads")
    known = suggestion or WIDTH_HEADS.get(embed_dim, (0, None))[1]
    if known:
        model = named_timm_model(known)
        count = int(model.blocks[0].attn.num_heads) if model is not None else "?"
        hint = Hint("arch", known, f"if this is timm's {known} ({count} heads, pre-norm blocks)",
                    alternative=heads_hint)
    else:
        hint = Hint("num_heads", "N", heads_hint.text, alternative=Hint("arch", None, "with its timm model name"))
    name = f"{evidence.checkpoint}: " if evidence.checkpoint else ""
    return CheckpointError(f"{name}this {embed_dim}-wide ViT checkpoint does not state {' or '.join(missing)}, and "
                           f"{looked}; a guess here would export a wrong model that still passes parity", hint=hint)
