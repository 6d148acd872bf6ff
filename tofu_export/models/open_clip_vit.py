"""The open_clip family: ``open_clip.transformer.VisionTransformer`` towers (``model.visual``) whose blocks are
``ResidualAttentionBlock``s with ``nn.MultiheadAttention``.

The attention is one fused module with a packed ``in_proj_weight [3C, C]``, so no module outputs the keys: the
matching metric is ``ln_1(x) @ W_k^T + b_k`` from the packed weight's middle third (one extra ``[N, C] x [C, C]``
product per reducing block). Proportional attention is the MHA's additive float mask ``log(size)``, ``[B * H, N,
N]``; average pooling (``pool_type="avg"``) is size-weighted. Attention-pool (CoCa) towers are refused.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tofu_export.models.family import FlopCosts, LoadedModel, ModelFamily, TextEncoder, UnsupportedModelError
from tofu_export.models.reduction import (
    ToFuState,
    TokenReduction,
    head_mean_keys,
    size_bias,
    size_weighted_mean,
    start_forward,
)
from tofu_export.schedule import RSpec, TokenPlan, layer_modes, parse_r, planned_for
from tofu_export.sizes import as_pair

__all__ = ["OpenClipFamily"]


def _keys(block: nn.Module, normed: Tensor) -> Tensor:
    """Per-head keys of the block's attention, ``[B, N, C] -> [B, H, N, D]``, from the packed in-projection."""
    attn: nn.MultiheadAttention = block.attn
    dim, heads = attn.embed_dim, attn.num_heads
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[dim:2 * dim]
    keys = F.linear(normed, attn.in_proj_weight[dim:2 * dim], bias)  # [B, N, C]
    tokens = int(keys.shape[1])
    return keys.reshape(-1, tokens, heads, dim // heads).transpose(1, 2)


def _mha_mask(state: ToFuState, heads: int) -> Tensor | None:
    """``log(size)`` as nn.MultiheadAttention's additive float mask ``[B * H, N, N]``, or None."""
    size = state.size
    if not state.prop_attn or size is None:
        return None
    tokens = int(size.shape[1])
    return size_bias(size).expand(-1, heads, tokens, tokens).reshape(-1, tokens, tokens)


def _attention_half(block: nn.Module, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``x [B, N, C]`` -> ``x + ls_1(attn(ln_1(x)))`` and the keys ``[B, H, N, D]``."""
    normed = block.ln_1(x)
    return x + block.ls_1(block.attention(q_x=normed, attn_mask=mask)), _keys(block, normed)


def _mlp_half(block: nn.Module, y: Tensor) -> Tensor:
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def _tofu_forward(self: nn.Module, q_x: Tensor, k_x: Tensor | None = None, v_x: Tensor | None = None,
                  attn_mask: Tensor | None = None) -> Tensor:
    """The patched block: attention half, ToFu's ``reduce`` (keys from the packed projection), MLP half."""
    state: ToFuState = self._tofu
    if self.reduce.index == 0:
        start_forward(state)
    if k_x is not None or v_x is not None or attn_mask is not None:
        raise ValueError("ToFu-patched vision blocks take no cross-attention inputs or attention mask")
    y, keys = _attention_half(self, q_x, _mha_mask(state, self.attn.num_heads))
    self.reduce.metric = head_mean_keys(keys)
    y, state.size = self.reduce(y, state.size)
    return _mlp_half(self, y)


_TOFU_CLASSES: dict[type, type] = {}


def _tofu_class(block_class: type) -> type:
    if block_class not in _TOFU_CLASSES:
        _TOFU_CLASSES[block_class] = type(f"ToFu{block_class.__name__}", (block_class,), {"forward": _tofu_forward})
    return _TOFU_CLASSES[block_class]


def _size_weighted_global_pool(self: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """open_clip's ``_global_pool`` with average pooling counting each token ``size`` times."""
    size = self._tofu.size
    if self.pool_type != "avg" or size is None:
        return type(self)._global_pool(self, x)
    return size_weighted_mean(x[:, 1:], size[:, 1:]), x[:, 1:]


class OpenClipFamily(ModelFamily):
    """open_clip ``VisionTransformer`` (the ``visual`` tower of CLIP-like models)."""

    name = "open_clip"
    classes = "open_clip VisionTransformer (model.visual)"

    # -- checkpoints (open_clip_load.py) ------------------------------------------------------------------------
    def recognises(self, path: Path) -> bool:
        from tofu_export.models.open_clip_files import looks_like_open_clip

        return looks_like_open_clip(path)

    def names_arch(self, arch: str) -> bool:
        return arch.startswith("open_clip:")

    def digest(self, path: Path) -> str:
        from tofu_export.hashing import sha256_file
        from tofu_export.models.open_clip_files import weights_file

        return sha256_file(weights_file(path))  # a hub folder's weights file, as load_open_clip records it

    def load(self, path: Path, *, arch: str | None, img_size: int | None, trust_pickle: bool,
             num_heads: int | None = None) -> LoadedModel:
        from tofu_export.models.open_clip_load import load_open_clip

        return load_open_clip(path, arch=arch, img_size=img_size, trust_pickle=trust_pickle, num_heads=num_heads)

    def text_encoder(self, path: Path, *, arch: str | None, trust_pickle: bool) -> TextEncoder:
        from tofu_export.models.open_clip_text import load_open_clip_text

        return load_open_clip_text(path, arch=arch, trust_pickle=trust_pickle)

    tuned_layout = "folder"

    def write_weights(self, model: nn.Module, loaded: LoadedModel, target: Path,
                      metadata: Mapping[str, str]) -> dict[str, Any]:
        """The source checkpoint with its visual tower replaced, as a hub folder (``open_clip_save``): open_clip's
        own ViT, or a timm trunk (SigLIP) this family read."""
        from tofu_export.models.open_clip_save import save_folder

        save_folder(model, loaded, target, dict(metadata), open_clip_vit=self.owns(model))
        return {}

    # -- geometry -------------------------------------------------------------------------------------------------
    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.") and type(model).__name__ == "VisionTransformer"

    def _check(self, model: nn.Module) -> None:
        if model.attn_pool is not None or not model.transformer.batch_first:
            raise UnsupportedModelError("ToFu patches open_clip towers with token or average pooling and batch-first "
                                        "blocks; attention-pool (CoCa) towers are not supported")

    def depth(self, model: nn.Module) -> int:
        return len(model.transformer.resblocks)

    def num_prefix(self, model: nn.Module) -> int:
        return 1  # the class embedding

    def img_size(self, model: nn.Module) -> tuple[int, int]:
        return as_pair(tuple(model.image_size))

    def num_tokens(self, model: nn.Module, img_size: int | Sequence[int] | None = None) -> int:
        size = self.img_size(model) if img_size is None else as_pair(img_size)
        if size != self.img_size(model):
            raise ValueError(f"the model was built for {self.img_size(model)} inputs and takes no other size")
        return model.grid_size[0] * model.grid_size[1] + 1

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.conv1.out_channels)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.resblocks

    def with_blocks(self, model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
        import copy

        transformer = model.transformer
        own = transformer._modules["resblocks"]
        transformer._modules["resblocks"] = nn.ModuleList()
        try:
            skeleton = copy.deepcopy(model)
        finally:
            transformer._modules["resblocks"] = own
        skeleton.transformer._modules["resblocks"] = nn.ModuleList(blocks)
        return skeleton

    def costs(self, model: nn.Module) -> FlopCosts:
        block, dim = model.transformer.resblocks[0], self.embed_dim(model)
        return FlopCosts(dim=dim, hidden=int(block.mlp.c_fc.out_features), metric_dim=dim // block.attn.num_heads,
                         embed_per_patch=model.conv1.weight.numel(),
                         head=0 if model.proj is None else model.proj.numel())

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """open_clip's eval transform in timm's keys (``open_clip_config.timm_preprocessing``), as the tower's
        ``preprocess_cfg`` (open_clip's own, or the hub config's) states it."""
        from tofu_export.models.open_clip_config import timm_preprocessing

        config = super().data_config(model)
        config.update(timm_preprocessing(getattr(model, "preprocess_cfg", None) or {}))
        return config

    def patch(self, model: nn.Module, r: RSpec = 16, mode: str | Sequence[str] = "tofu", prop_attn: bool = True,
              img_size: int | Sequence[int] | None = None, *, prune_layers: int | None = None,
              strict: bool = False, plan: TokenPlan | None = None) -> nn.Module:
        self._check(model)
        self.unpatch(model)
        depth = self.depth(model)
        state = ToFuState(r=parse_r(r, depth), modes=layer_modes(mode, depth, prune_layers), prop_attn=prop_attn,
                          num_prefix=1, plan=None, img_size=None if img_size is None else as_pair(img_size))
        plan = planned_for(plan, self.num_tokens(model, img_size), 1, state.r, strict)
        state.plan = plan if img_size is not None else None
        for index, block in enumerate(model.transformer.resblocks):
            block.reduce = TokenReduction(state, index)
            block._tofu, block._tofu_original_class = state, type(block)
            block.__class__ = _tofu_class(type(block))
        model._tofu = state
        model._global_pool = types.MethodType(_size_weighted_global_pool, model)
        return model

    def unpatch(self, model: nn.Module) -> nn.Module:
        if getattr(model, "_tofu", None) is None:
            return model
        for block in model.transformer.resblocks:
            block.__class__ = block._tofu_original_class
            del block.reduce, block._tofu, block._tofu_original_class
        del model._tofu, model._global_pool
        return model

    def state(self, model: nn.Module) -> ToFuState | None:
        return getattr(model, "_tofu", None)

    def embed(self, model: nn.Module, images: Tensor) -> Tensor:
        return model._embeds(images)  # [B, N, C]: patches, class token, positions, ln_pre

    def attention_half(self, model: nn.Module, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        y, keys = _attention_half(model.transformer.resblocks[index], x, None)
        return y, head_mean_keys(keys)

    def mlp_half(self, model: nn.Module, index: int, y: Tensor) -> Tensor:
        return _mlp_half(model.transformer.resblocks[index], y)

    def run_blocks(self, model: nn.Module, x: Tensor, start: int) -> Tensor:
        state = self.state(model)
        if state is not None:
            start_forward(state)
        for block in model.transformer.resblocks[start:]:
            x = block(x)
        return x

    def pooled_output(self, model: nn.Module, x: Tensor) -> Tensor:
        pooled, _ = model._pool(x)
        return pooled if model.proj is None else pooled @ model.proj
