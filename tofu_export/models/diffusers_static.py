"""Build-time static rewrites of diffusers modules whose exported graph the TensorRT static check cannot follow.

``Upsample2D`` doubles a feature map with ``F.interpolate(scale_factor=2.0, mode="nearest")``: a ``Resize`` whose
output batch is ``floor(1.0 * batch)`` to shape inference, no longer the batch axis, so the skip ``Concat`` after it
mixes two batch symbols and everything downstream has an unknown shape. ``StaticUpsample2D`` does the same nearest x2
as expand + reshape (exactly equal; the OpenAI UNet's ``Upsample`` does the same). Calls with an explicit
``output_size``, transposed convolutions and non-interpolating upsamplers go to the original module unchanged.
``make_static`` swaps every ``Upsample2D``; ``undo_static`` puts the originals back.
"""

from __future__ import annotations

from torch import Tensor, nn


def nearest_x2(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 of ``x [B, C, H, W]`` -> ``[B, C, 2H, 2W]`` without a Resize."""
    b, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class StaticUpsample2D(nn.Module):
    """``Upsample2D`` with its nearest x2 as expand + reshape: ``[B, C, H, W] -> [B, C', 2H, 2W]``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states: Tensor, output_size: int | None = None, *args, **kwargs) -> Tensor:
        inner = self.inner
        if output_size is not None or inner.use_conv_transpose or not inner.interpolate or args or kwargs:
            return inner(hidden_states, output_size, *args, **kwargs)
        if inner.norm is not None:
            hidden_states = inner.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        hidden_states = nearest_x2(hidden_states)
        if inner.use_conv:
            hidden_states = inner.conv(hidden_states) if inner.name == "conv" else inner.Conv2d_0(hidden_states)
        return hidden_states


def _upsamplers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, child)`` for every ``Upsample2D`` or ``StaticUpsample2D`` child in ``model``."""
    from diffusers.models.upsampling import Upsample2D

    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, Upsample2D | StaticUpsample2D)]


def make_static(model: nn.Module) -> nn.Module:
    """Swap every ``Upsample2D`` of ``model`` for a ``StaticUpsample2D`` (idempotent); returns ``model``."""
    for parent, name, child in _upsamplers(model):
        if not isinstance(child, StaticUpsample2D):
            setattr(parent, name, StaticUpsample2D(child))
    return model


def undo_static(model: nn.Module) -> nn.Module:
    """Put back every ``Upsample2D`` that ``make_static`` swapped; returns ``model``."""
    for parent, name, child in _upsamplers(model):
        if isinstance(child, StaticUpsample2D):
            setattr(parent, name, child.inner)
    return model
