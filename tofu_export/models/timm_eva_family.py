"""The timm ``Eva`` family (EVA-02, DINOv3, ...: rotary position embeddings): a ``TimmFamily`` in its geometry, with
the patch of ``timm_eva.py``, the calibration hooks (a block run as its two residual halves, with the model's
rotations), and checkpoints.

A timm checkpoint file is read by the timm family (the fallback for files); where its architecture is named (``--arch``,
or the ``config.json`` / sidecar beside it) and is a timm ``Eva``, it is built here (``build_eva``): the named
model created as timm creates it, its weights checked key by key and shape by shape against the file, loaded, and
its position embedding (where it has one) resampled for another ``--img-size`` as timm does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tofu_export.checkpoint import CheckpointError
from tofu_export.errors import Hint
from tofu_export.models import timm_eva
from tofu_export.models.family import ArchGuess, FlopCosts
from tofu_export.models.reduction import start_forward
from tofu_export.models.timm_family import TimmFamily, with_keys
from tofu_export.schedule import RSpec, TokenPlan

__all__ = ["TimmEvaFamily", "build_eva", "names_eva"]


def names_eva(name: str | None) -> bool:
    """Whether ``name`` is a timm model built by ``timm.models.eva`` (EVA-02, DINOv3, PE)."""
    if not name:
        return False
    import timm

    return timm.is_model(name) and timm.models.is_model_in_modules(name, ["eva"])


def build_eva(state_dict: Mapping[str, Tensor], name: str, *, img_size: int | None, source: str,
              preprocessing: Mapping[str, Any] | None = None, global_pool: str | None = None,
              model_args: Mapping[str, Any] | None = None) -> tuple[nn.Module, ArchGuess]:
    """The timm ``Eva`` ``name`` (``source`` named it, with ``model_args``: a training record's kwargs) holding
    ``state_dict``, in eval mode; at ``img_size`` with its absolute position embedding resampled (bicubic, as timm's
    loading does; rotations follow the grid); ``global_pool`` where the source states the pooling (open_clip's
    ``timm_pool``). The head's width is the weights'."""
    import timm
    from timm.layers import resample_abs_pos_embed

    head = state_dict.get("head.weight")
    kwargs: dict[str, Any] = {**(model_args or {}), "num_classes": int(head.shape[0]) if head is not None else 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if global_pool is not None:
        kwargs["global_pool"] = global_pool
    overlay = {"pretrained_cfg_overlay": dict(preprocessing)} if preprocessing else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs, **overlay)
    except (TypeError, ValueError, AssertionError) as error:  # a kwarg the model does not take
        raise CheckpointError(f"timm could not create {name} with {kwargs} ({source} names it): "
                              f"{type(error).__name__}: {error}",
                              hint=Hint("arch", None, "naming the timm model the weights were trained as")) from error
    weights, notes = dict(state_dict), []
    pos = weights.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        weights["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                      num_prefix_tokens=prefix)
        notes.append(f"pos_embed resampled from {tuple(pos.shape)} to {tuple(model.pos_embed.shape)} (bicubic)")
    expected = model.state_dict()
    wrong = [f"{key} {list(weights[key].shape)} (the model: {list(expected[key].shape)})" for key in expected
             if key in weights and weights[key].shape != expected[key].shape]
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    problems = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("mis-shaped", wrong), ("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise CheckpointError(f"the checkpoint does not fit timm's {name} ({source} names it): {'; '.join(problems)}",
                              hint=Hint("arch", None, "naming the timm model the weights were trained as"))
    model.load_state_dict(weights, strict=True)
    provenance = {"architecture": source, "num_heads": f"{source} ({name})", "block": f"{source} ({name})",
                  "preprocessing": f"{source} pretrained_cfg" if preprocessing else f"timm's defaults for {name}"}
    reason = (f"timm Eva {name} ({source} names it): {len(model.blocks)} blocks, width {model.embed_dim}, "
              f"{model.num_prefix_tokens} prefix tokens, {'rotary' if model.rope is not None else 'no rotary'} "
              f"position embeddings, pool={model.global_pool or 'none'}")
    return model.eval(), ArchGuess(name=name, kwargs=kwargs, reason=reason, notes=tuple(notes), provenance=provenance)


class TimmEvaFamily(TimmFamily):
    """timm ``Eva`` (EVA-02, DINOv3) with pre-norm ``EvaBlock``s and rotary position embeddings: a timm model like
    ``VisionTransformer`` in all its geometry; its own patch, MLP and calibration hooks (rotations)."""

    name = "timm_eva"
    classes = "timm Eva (EVA-02, DINOv3: rotary position embeddings)"

    def recognises(self, path: Path) -> bool:
        return False  # a file is the timm family's to read: it builds an Eva here where the checkpoint names one

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__ == "timm.models.eva" and type(model).__name__ == "Eva"

    def costs(self, model: nn.Module) -> FlopCosts:
        block, proj, dim = model.blocks[0], model.patch_embed.proj, int(model.embed_dim)
        mlp_macs = sum(m.weight.numel() for m in block.mlp.modules() if isinstance(m, nn.Linear))  # SwiGLU: 3 mats
        kernel = proj.kernel_size[0] * proj.kernel_size[1]
        return FlopCosts(dim=dim, hidden=mlp_macs // (2 * dim), metric_dim=dim // int(block.attn.num_heads),
                         embed_per_patch=proj.in_channels * proj.out_channels * kernel,
                         head=dim * getattr(model.head, "out_features", 0))

    # -- patching -------------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
              img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
              strict: bool = False, plan: TokenPlan | None = None) -> nn.Module:
        return timm_eva.patch(model, r, mode, prop_attn, img_size, prune_layers=prune_layers, strict=strict,
                              plan=plan)

    # -- calibration hooks ----------------------------------------------------------------------------------------
    def _rope(self, model: nn.Module, x: Tensor) -> Tensor | None:
        """The rotations of block inputs ``x [B, N, C]`` at the model's own input size (every token present)."""
        grid = model.patch_embed.grid_size
        if x.shape[1] != grid[0] * grid[1] + model.num_prefix_tokens:
            raise ValueError(f"the calibration hooks take all {grid[0] * grid[1]} patch tokens, got {x.shape[1]}")
        return timm_eva.rope_of(model, grid)

    def block_inputs(self, model: nn.Module, tokens: int) -> dict[str, Any]:
        rope = timm_eva.rope_of(model, model.patch_embed.grid_size)
        return {} if rope is None else {"rope": rope[: tokens - model.num_prefix_tokens]}

    def embed(self, model: nn.Module, images: Tensor) -> Tensor:
        x, _ = model._pos_embed(model.patch_embed(images))  # [B, N, C]
        return model.norm_pre(x)

    def attention_half(self, model: nn.Module, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        block, rope = model.blocks[index], self._rope(model, x)

        def half() -> Tensor:
            x_attn = block.attn(block.norm1(x), rope=rope)
            return x + block.drop_path1(x_attn if block.gamma_1 is None else block.gamma_1 * x_attn)

        return with_keys(block, half)

    def mlp_half(self, model: nn.Module, index: int, y: Tensor) -> Tensor:
        block = model.blocks[index]
        y_mlp = block.mlp(block.norm2(y))
        return y + block.drop_path2(y_mlp if block.gamma_2 is None else block.gamma_2 * y_mlp)

    def run_blocks(self, model: nn.Module, x: Tensor, start: int) -> Tensor:
        state = self.state(model)
        if state is not None:
            start_forward(state)
        rope = self._rope(model, x)
        for block in model.blocks[start:]:
            x = block(x, rope=rope)  # a patched block hands on the kept rotations itself (state.rope)
        return x
