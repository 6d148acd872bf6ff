"""Dense ToFu for the OpenAI UNet: ``patch`` gives chosen ``AttentionBlock``s a ``DenseToFu``; ``unpatch`` removes
them. The patch is the only thing that sets or clears ``AttentionBlock.tofu``."""

from __future__ import annotations

from torch import nn

from tofu_export.dense.module import DenseToFu
from tofu_export.dense.plan import DensePolicy
from tofu_export.errors import Hint, UserError
from tofu_export.models.openai_unet import AttentionBlock, UNetModel


def attention_grids(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every ``AttentionBlock``'s name -> its token grid ``(height, width)`` at the model's image size."""
    network = model.network if hasattr(model, "network") else model
    if not isinstance(network, UNetModel):
        raise UserError("not an OpenAI UNet (no UNetModel inside)")
    prefix = "network." if network is not model else ""
    names = [f"input_blocks.{i}" for i in range(len(network.input_blocks))]
    names += ["middle_block"] + [f"output_blocks.{i}" for i in range(len(network.output_blocks))]
    grids, ds = {}, 1  # ds: downsampling of the stage, followed along the block order
    for name in names:
        for i, layer in enumerate(network.get_submodule(name)):
            if isinstance(layer, AttentionBlock):
                side = network.config.image_size // ds
                grids[f"{prefix}{name}.{i}"] = (side, side)
            if getattr(layer, "updown", False):
                ds = ds // 2 if layer.h_upd.up else ds * 2
    return grids


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every reduction ``patch`` added."""
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.tofu = None
    return model


def patch(model: nn.Module, policy: DensePolicy) -> nn.Module:
    """Give the blocks of ``policy`` their reduction (removing any earlier patch first); returns ``model``."""
    unpatch(model)
    grids = attention_grids(model)
    unknown = sorted(set(policy.blocks) - set(grids))
    if unknown:
        raise UserError(f"the policy names blocks this UNet does not have: {', '.join(unknown)}",
                        hint=Hint("policy", None, f"blocks here: {', '.join(grids)}"))
    for name, plan in policy.blocks.items():
        height, width = grids[name]
        block = model.get_submodule(name)
        block.tofu = DenseToFu(height, width, plan.ratio, plan.mode, policy.stride, policy.seed)
    return model
