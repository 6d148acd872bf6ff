"""Dense ToFu in diffusers' ``BasicTransformerBlock`` (the blocks of ``UNet2DConditionModel``'s ``Transformer2DModel``
stages, of ``DiTTransformer2DModel`` and of ``PixArtTransformer2DModel``).

A block runs ``x += attn1(norm1(x))``, ``x += attn2(norm2(x), context)``, ``x += ff(norm3(x))`` (with ada-norm
variants). ``patch_block`` wraps the chosen sub-layers (``self`` = ``attn1``, ``cross`` = ``attn2``, ``mlp`` = ``ff``)
in ``ReducedSubLayer``: its input ``[B, N, C]`` is reduced to ``[B, N - r, C]`` before the sub-layer and the output
unmerged to ``[B, N, C]`` after, so the residual adds see every token. The block's sub-layers share one matching per
forward (``SharedMatching``, as ToMe for SD computes one per block): the first reduced sub-layer matches on its own
input, the others reuse it. Cross-attention reduces its queries; the context is untouched. Self-attention with a
token mask is left unreduced (the mask would no longer fit). ``unpatch_block`` puts the original sub-layers back.
"""

from __future__ import annotations

from torch import Tensor, nn

from tofu_export.dense.module import DenseToFu, SharedMatching

ATTRIBUTES = {"self": "attn1", "cross": "attn2", "mlp": "ff"}  # sub-layer -> BasicTransformerBlock attribute


class ReducedSubLayer(nn.Module):
    """A ``BasicTransformerBlock`` sub-layer with dense ToFu around it: ``[B, N, C] -> [B, N, C]``."""

    def __init__(self, inner: nn.Module, tofu: DenseToFu, shared: SharedMatching, first: bool, last: bool) -> None:
        super().__init__()
        self.inner, self.tofu = inner, tofu
        self._shared, self.first, self.last = shared, first, last

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        context = args[0] if args else kwargs.get("encoder_hidden_states")
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        shared = self._shared
        if self.first:
            shared.matching = None
        if context is None and mask is not None:  # self-attention over a token mask: not reducible
            out = self.inner(hidden_states, *args, **kwargs)
        else:
            out = self.tofu(hidden_states, lambda t: self.inner(t, *args, **kwargs), shared)
        if self.last:
            shared.matching = None
        return out

    def extra_repr(self) -> str:
        return f"first={self.first}, last={self.last}"


def patch_block(block: nn.Module, tofu: DenseToFu, sublayers: tuple[str, ...]) -> list[str]:
    """Wrap ``sublayers`` of one (unpatched) ``block`` around one shared matching; returns the ones it has."""
    present = [name for name in sublayers if getattr(block, ATTRIBUTES[name], None) is not None]
    shared = SharedMatching()
    for i, name in enumerate(present):
        inner = getattr(block, ATTRIBUTES[name])
        setattr(block, ATTRIBUTES[name], ReducedSubLayer(inner, tofu, shared, i == 0, i == len(present) - 1))
    return present


def unpatch_block(block: nn.Module) -> None:
    """Put back the sub-layers ``patch_block`` wrapped."""
    for attribute in ATTRIBUTES.values():
        module = getattr(block, attribute, None)
        if isinstance(module, ReducedSubLayer):
            setattr(block, attribute, module.inner)


def transformer_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``BasicTransformerBlock`` of ``model`` by module path."""
    from diffusers.models.attention import BasicTransformerBlock

    return {name: m for name, m in model.named_modules() if isinstance(m, BasicTransformerBlock)}
