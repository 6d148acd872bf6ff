"""The timm ``Eva`` family (EVA-02, DINOv3, ...: rotary position embeddings): a ``TimmFamily`` in its geometry, with
the patch of ``timm_eva.py`` and the calibration hooks (a block run as its two residual halves, with the model's
rotations). Its checkpoints are timm files, read by the timm family and built by ``timm_eva_build.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tofu_export.models import timm_eva
from tofu_export.models.family import FlopCosts, mlp_width
from tofu_export.models.reduction import start_forward
from tofu_export.models.timm_family import TimmFamily, with_keys
from tofu_export.schedule import RSpec, TokenPlan

__all__ = ["TimmEvaFamily"]


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
        kernel = proj.kernel_size[0] * proj.kernel_size[1]
        return FlopCosts(dim=dim, hidden=mlp_width(block.mlp, dim), metric_dim=dim // int(block.attn.num_heads),
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
