"""Token and compute accounting: tokens per block and GFLOPs of a (patched) ViT versus the original."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from tofu_export.models.family import family_of
from tofu_export.schedule import block_macs, plan_tokens
from tofu_export.sizes import as_pair


@dataclass(frozen=True)
class TokenSchedule:
    """Per-block token counts and the compute they imply, for one input size.

    GFLOPs follow the papers' convention (fvcore): one multiply-accumulate counts as one FLOP.
    """

    img_size: tuple[int, int]
    tokens: list[int]  # [depth] tokens entering each block
    r: list[int]  # [depth] tokens removed in each block
    modes: list[str]  # [depth] reduce mode per block ("none" when unpatched)
    gflops_original: float
    gflops_reduced: float

    @property
    def flop_ratio(self) -> float:
        """How many times fewer FLOPs the reduced model needs."""
        return self.gflops_original / self.gflops_reduced

    def to_dict(self) -> dict:
        return {**asdict(self), "flop_ratio": self.flop_ratio}


def _model_gflops(model: nn.Module, tokens: Sequence[int], removed: Sequence[int], n_in: int) -> float:
    family = family_of(model)
    costs, num_prefix = family.costs(model), family.num_prefix(model)
    embed = (n_in - num_prefix) * costs.embed_per_patch
    blocks = sum(
        block_macs(n, r, costs.dim, costs.hidden, num_prefix, costs.metric_dim)
        for n, r in zip(tokens, removed, strict=True)
    )
    return (embed + blocks + costs.head) / 1e9


def token_schedule(model: nn.Module, img_size: int | Sequence[int] | None = None) -> TokenSchedule:
    """Tokens per block and GFLOPs of ``model`` (patched or not) against the same model without ToFu."""
    family = family_of(model)
    state = family.state(model)
    if img_size is None and state is not None and state.img_size is not None:
        img_size = state.img_size
    n_in = family.num_tokens(model, img_size)
    depth = family.depth(model)
    if state is None:
        tokens, removed, modes = [n_in] * depth, [0] * depth, ["none"] * depth
    else:
        plan = state.plan if state.plan is not None and state.plan.tokens[0] == n_in else None
        if plan is None:
            plan = plan_tokens(n_in, state.num_prefix, state.r, warn=False)  # clipping was reported at patch time
        tokens, removed, modes = plan.tokens, plan.r, list(state.modes)
    size = family.img_size(model) if img_size is None else as_pair(img_size)
    return TokenSchedule(
        img_size=size,
        tokens=list(tokens),
        r=list(removed),
        modes=modes,
        gflops_original=_model_gflops(model, [n_in] * depth, [0] * depth, n_in),
        gflops_reduced=_model_gflops(model, tokens, removed, n_in),
    )
